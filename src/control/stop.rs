//! What each unit is left holding when the EMS stops: an inverter-side limit that keeps
//! the site inside its export limit with nobody in charge.
//!
//! Each unit gets the same share α of its rating, the largest that keeps every phase (or the
//! phase sum) inside the tightest export limit in force — the site's and demand response's
//! — even if the whole load disappears: for a phase, Σ weightᵢ,ₚₕ · α · ratedᵢ ≤ allowanceₚₕ,
//! where a three-phase unit puts a third of its output on each phase and a single-phase unit
//! all of it on its own. A cap at the unit's share is safe whether the firmware applies it
//! to the unit's own output or to the export it measures (see `drivers::saj`).

use super::constraints::Constraints;
use super::params::{ControlParams, GridLimit};

/// Per unit, in config order: the most AC output it may deliver with the EMS gone, W. The
/// site's export limit from `p` and every export limit and DRM in `c` are kept.
pub fn stop_caps(p: &ControlParams, c: &Constraints) -> Vec<f64> {
    if c.standby {
        return vec![0.0; p.units.len()];
    }
    // The site's own limit always holds, whether or not a cycle has gathered it into `c`
    // yet (a stop before the first cycle).
    let alpha = std::iter::once(p.export)
        .chain(c.export.iter().map(|cap| cap.limit))
        .map(|limit| share(p, limit))
        .fold(1.0_f64, f64::min)
        .clamp(0.0, 1.0);
    let generation = c.generation_pct.map_or(1.0, |pct| pct / 100.0);
    p.units
        .iter()
        .map(|u| u.rated_w * alpha.min(generation))
        .collect()
}

/// The share of every unit's rating that keeps the fleet inside `limit` with no load.
fn share(p: &ControlParams, limit: GridLimit) -> f64 {
    let total_rated: f64 = p.units.iter().map(|u| u.rated_w).sum();
    if total_rated <= 0.0 {
        return 0.0;
    }
    let per_phase = |allow_w: f64| {
        p.phases
            .iter()
            .map(|&ph| {
                let on_phase: f64 = p.units.iter().map(|u| u.weight(ph) * u.rated_w).sum();
                if on_phase > 0.0 {
                    allow_w / on_phase
                } else {
                    f64::INFINITY
                }
            })
            .fold(f64::INFINITY, f64::min)
    };
    let alpha = match limit {
        GridLimit::Total(w) => w / total_rated,
        GridLimit::PhasePower(w) => per_phase(w),
        // Nominal voltage: the phase may sag, but the limit in amperes then allows less
        // power, so take the nominal value down by the usual 10 % tolerance.
        GridLimit::PhaseCurrent(a) => per_phase(a * p.nominal_v * 0.9),
    };
    if alpha.is_finite() {
        alpha.max(0.0)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Phase;
    use crate::control::constraints::{GridCap, Source};
    use crate::control::tests::params_with;

    fn site(limit: GridLimit) -> Constraints {
        Constraints {
            export: vec![GridCap {
                source: Source::Site,
                limit,
            }],
            ..Constraints::default()
        }
    }

    #[test]
    fn zero_export_leaves_zero_everywhere() {
        let p = params_with(&[&Phase::ALL, &Phase::ALL], GridLimit::Total(0.0));
        assert_eq!(stop_caps(&p, &site(p.export)), vec![0.0, 0.0]);
    }

    #[test]
    fn the_site_limit_holds_even_before_any_constraint_was_gathered() {
        let p = params_with(&[&Phase::ALL, &Phase::ALL], GridLimit::Total(0.0));
        assert_eq!(stop_caps(&p, &Constraints::default()), vec![0.0, 0.0]);
    }

    #[test]
    fn a_total_limit_is_shared_by_rating() {
        let p = params_with(&[&Phase::ALL, &Phase::ALL], GridLimit::Total(5000.0));
        let caps = stop_caps(&p, &site(p.export));
        assert!((caps.iter().sum::<f64>() - 5000.0).abs() < 1e-6, "{caps:?}");
    }

    #[test]
    fn a_phase_limit_counts_single_phase_units_on_their_phase() {
        // A 10 kW unit on L1 and a 10 kW three-phase unit, 2 kW per phase: L1 carries
        // α·10 kW + α·10 kW / 3 ≤ 2 kW.
        let p = params_with(&[&[Phase::L1], &Phase::ALL], GridLimit::PhasePower(2000.0));
        let caps = stop_caps(&p, &site(p.export));
        let l1 = caps[0] + caps[1] / 3.0;
        assert!((l1 - 2000.0).abs() < 1e-6, "{caps:?}");
    }

    #[test]
    fn demand_response_tightens_and_standby_zeroes() {
        let p = params_with(&[&Phase::ALL], GridLimit::Total(8000.0));
        let mut c = site(p.export);
        c.export.push(GridCap {
            source: Source::DemandResponse,
            limit: GridLimit::Total(1000.0),
        });
        assert_eq!(stop_caps(&p, &c), vec![1000.0]);
        c.generation_pct = Some(5.0);
        assert_eq!(stop_caps(&p, &c), vec![500.0]);
        c.standby = true;
        assert_eq!(stop_caps(&p, &c), vec![0.0]);
    }
}
