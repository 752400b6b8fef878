//! Exact aggregation: batteries that are the same battery at another scale are planned as one.
//!
//! Two batteries fall in one class when their efficiencies, start SOC, SOC bounds and
//! everything per Wh of capacity (charge and discharge limits, AC rating, share of the PV)
//! are equal. Then a plan for the class, shared out in proportion to capacity, keeps every
//! member at the class's SOC and within its own limits at every step — so the class is exact,
//! not an approximation. Batteries that differ in any of these are planned one by one.

use super::PlanInputs;

/// One class, its limits summed over its members (W, Wh).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Class {
    pub members: Vec<usize>,
    pub eta_c: f64,
    pub eta_d: f64,
    pub cap_wh: f64,
    pub max_c_w: f64,
    pub max_d_w: f64,
    /// The members' AC ratings, for hybrids whose PV shares the rating.
    pub rated_w: f64,
    /// The members' share of the site's PV forecast (DC PV on these units).
    pub pv_share: f64,
    pub e0_wh: f64,
    /// The floor: SOC minimum or the back-up reserve, whichever is higher.
    pub lo_wh: f64,
    pub hi_wh: f64,
}

impl Class {
    /// The start lies within the bounds, so idling keeps them and they can be hard.
    pub(super) fn bounds_hold_at_start(&self) -> bool {
        self.e0_wh >= self.lo_wh - 1e-9 && self.e0_wh <= self.hi_wh + 1e-9
    }
}

/// What makes two batteries plan alike, per Wh of capacity where it scales.
fn key(i: &PlanInputs, k: usize) -> [f64; 9] {
    let b = &i.batteries[k];
    let cap = b.capacity_wh.max(1e-9);
    [
        b.charge_efficiency,
        b.discharge_efficiency,
        b.soc_pct,
        b.soc_min_pct.max(i.reserve_pct),
        b.soc_max_pct,
        b.max_charge_w / cap,
        b.max_discharge_w / cap,
        b.rated_w / cap,
        b.pv_share / cap,
    ]
}

pub(super) fn classes(i: &PlanInputs) -> Vec<Class> {
    let mut keys: Vec<[f64; 9]> = Vec::new();
    let mut out: Vec<Class> = Vec::new();
    for (k, b) in i.batteries.iter().enumerate() {
        let key = key(i, k);
        let c = match keys.iter().position(|x| *x == key) {
            Some(at) => &mut out[at],
            None => {
                keys.push(key);
                out.push(Class {
                    members: Vec::new(),
                    eta_c: b.charge_efficiency,
                    eta_d: b.discharge_efficiency,
                    cap_wh: 0.0,
                    max_c_w: 0.0,
                    max_d_w: 0.0,
                    rated_w: 0.0,
                    pv_share: 0.0,
                    e0_wh: 0.0,
                    lo_wh: 0.0,
                    hi_wh: 0.0,
                });
                let last = out.len() - 1;
                &mut out[last]
            }
        };
        c.members.push(k);
        c.cap_wh += b.capacity_wh;
        c.max_c_w += b.max_charge_w;
        c.max_d_w += b.max_discharge_w;
        c.rated_w += b.rated_w;
        c.pv_share += b.pv_share;
        c.e0_wh += b.capacity_wh * b.soc_pct / 100.0;
        c.lo_wh += b.capacity_wh * b.soc_min_pct.max(i.reserve_pct) / 100.0;
        c.hi_wh += b.capacity_wh * b.soc_max_pct / 100.0;
    }
    out
}
