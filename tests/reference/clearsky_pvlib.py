"""Clear-sky PV of one site from pvlib: an independent reference for src/sky.rs
(tests/sky_reference.rs).

The same models by name, computed by pvlib's own code: NREL SPA sun position with refraction,
Ineichen clear sky with a given Linke turbidity, Kasten-Young air mass, Spencer's
extraterrestrial irradiance, Hay-Davies transposition with albedo 0.25, AC = POA / 1000 x kWp x
(1 - losses).

Input on stdin: {"latitude", "longitude", "altitude", "tz", "linke", "arrays": [{"kwp",
"tilt_deg", "azimuth_deg", "losses_pct"}], "days": ["YYYY-MM-DD", ...]}. Output on stdout: one
object per day: {"day", "energy_kwh", "peak_w", "transit"} (transit: solar noon, RFC 3339 UTC),
sampled every 5 minutes at the middle of each 5 minutes of the local day."""
import json
import sys

import pandas as pd
import pvlib


def main():
    d = json.load(sys.stdin)
    loc = pvlib.location.Location(d["latitude"], d["longitude"], tz=d["tz"], altitude=d["altitude"])
    out = []
    for day in d["days"]:
        start = pd.Timestamp(day, tz=d["tz"])
        times = pd.date_range(start + pd.Timedelta(seconds=150), periods=288, freq="300s")
        sp = loc.get_solarposition(times)
        dni_extra = pvlib.irradiance.get_extra_radiation(times, method="spencer")
        cs = loc.get_clearsky(times, model="ineichen", solar_position=sp, dni_extra=dni_extra,
                              linke_turbidity=d["linke"])
        ac = 0.0
        for a in d["arrays"]:
            poa = pvlib.irradiance.get_total_irradiance(
                a["tilt_deg"], a["azimuth_deg"], sp["apparent_zenith"], sp["azimuth"],
                cs["dni"], cs["ghi"], cs["dhi"], dni_extra=dni_extra, model="haydavies",
                albedo=0.25)["poa_global"].fillna(0.0)
            ac = ac + poa.clip(lower=0.0) / 1000.0 * a["kwp"] * 1000.0 * (1.0 - a["losses_pct"] / 100.0)
        transit = pvlib.solarposition.sun_rise_set_transit_spa(
            pd.DatetimeIndex([start + pd.Timedelta(hours=12)]), d["latitude"], d["longitude"])["transit"].iloc[0]
        out.append({
            "day": day,
            "energy_kwh": float(ac.sum() * 5.0 / 60.0 / 1000.0),
            "peak_w": float(ac.max()),
            "transit": transit.tz_convert("UTC").isoformat(),
        })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
