//! Export compliance: a record of every interval in which the site exported more than the
//! limit in force, the proof installers and network operators ask an export limitation
//! scheme for (G100 Issue 2 counts excursions: one of 15 s or more is a "stage 2"
//! excursion, one of 60 s or more locks the scheme out; docs/design.md).
//!
//! Pure: the guard loop hands [`ExcursionWatch::observe`] each cycle's grid reading and the
//! limits in force, and gets back an excursion when one has ended. The store keeps them;
//! the API and `ems report` read them back.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::Phase;
use crate::control::GridLimit;

/// What an excursion's peak is measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantity {
    /// Export power, W (total or one phase).
    Watts,
    /// Export current on one phase, A.
    Amperes,
}

impl Quantity {
    pub fn unit(self) -> &'static str {
        match self {
            Quantity::Watts => "W",
            Quantity::Amperes => "A",
        }
    }

    fn parse(s: &str) -> Option<Quantity> {
        match s {
            "W" => Some(Quantity::Watts),
            "A" => Some(Quantity::Amperes),
            _ => None,
        }
    }
}

/// One interval of export over the limit in force.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Excursion {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub duration_s: f64,
    /// The most export seen, in `unit`.
    pub peak: f64,
    /// The limit it went over, in `unit`.
    pub limit: f64,
    pub unit: Quantity,
    /// The phase, in the per-phase modes.
    pub phase: Option<Phase>,
    /// The limit that was exceeded: `export_limit` (the site's) or `dr:export_limit`.
    pub constraint: String,
    /// Fail-safe acted during the excursion (the meter was lost or frozen).
    pub fail_safe: bool,
}

/// How far over a limit the site is right now.
#[derive(Debug, Clone, PartialEq)]
pub struct Over {
    pub value: f64,
    pub limit: f64,
    pub unit: Quantity,
    pub phase: Option<Phase>,
    pub constraint: String,
}

/// A limit in force and its name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitInForce {
    pub limit: GridLimit,
    pub dr: bool,
}

/// The export now against every limit in force: the one exceeded by the largest share of
/// itself, if any. `grid`: per phase (phase, W + import, V).
pub fn over_limit(grid: &[(Phase, f64, f64)], limits: &[LimitInForce]) -> Option<Over> {
    let mut worst: Option<(f64, Over)> = None;
    let mut consider = |value: f64, limit: f64, unit, phase, dr: bool| {
        if value <= limit + 1e-9 {
            return;
        }
        // Compare excursions of different limits by their excess over the limit's size.
        let share = (value - limit) / limit.abs().max(1.0);
        if worst.as_ref().is_none_or(|(s, _)| share > *s) {
            let constraint = if dr {
                "dr:export_limit"
            } else {
                "export_limit"
            };
            worst = Some((
                share,
                Over {
                    value,
                    limit,
                    unit,
                    phase,
                    constraint: constraint.to_string(),
                },
            ));
        }
    };
    for l in limits {
        match l.limit {
            GridLimit::Total(w) => {
                let export: f64 = -grid.iter().map(|g| g.1).sum::<f64>();
                consider(export, w, Quantity::Watts, None, l.dr);
            }
            GridLimit::PhasePower(w) => {
                for &(phase, power_w, _) in grid {
                    consider(-power_w, w, Quantity::Watts, Some(phase), l.dr);
                }
            }
            GridLimit::PhaseCurrent(a) => {
                for &(phase, power_w, voltage_v) in grid {
                    if voltage_v > 1.0 {
                        consider(
                            -power_w / voltage_v,
                            a,
                            Quantity::Amperes,
                            Some(phase),
                            l.dr,
                        );
                    }
                }
            }
        }
    }
    worst.map(|(_, o)| o)
}

/// An excursion under way.
#[derive(Debug, Clone, PartialEq)]
struct Open {
    start: DateTime<Utc>,
    worst: Over,
    fail_safe: bool,
}

/// Follows the export cycle by cycle and closes excursions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExcursionWatch {
    open: Option<Open>,
}

impl ExcursionWatch {
    /// One cycle at `t`: `over` is what [`over_limit`] found (`None`: within every limit, or
    /// no fresh reading — a lost meter ends nothing, it is fail-safe's to handle); returns
    /// the excursion that ended with this cycle.
    pub fn observe(
        &mut self,
        t: DateTime<Utc>,
        over: Option<Over>,
        measured: bool,
        fail_safe: bool,
    ) -> Option<Excursion> {
        match (over, self.open.as_mut()) {
            (Some(o), Some(open)) => {
                open.fail_safe |= fail_safe;
                if o.value - o.limit > open.worst.value - open.worst.limit {
                    open.worst = o;
                }
                None
            }
            (Some(o), None) => {
                self.open = Some(Open {
                    start: t,
                    worst: o,
                    fail_safe,
                });
                None
            }
            (None, Some(open)) if measured => {
                let open = open.clone();
                self.open = None;
                Some(close(open, t))
            }
            (None, Some(open)) => {
                open.fail_safe |= fail_safe;
                None
            }
            (None, None) => None,
        }
    }

    /// The excursion under way, as if it ended at `t` (for a clean stop).
    pub fn finish(&mut self, t: DateTime<Utc>) -> Option<Excursion> {
        self.open.take().map(|o| close(o, t))
    }

    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }
}

fn close(o: Open, end: DateTime<Utc>) -> Excursion {
    Excursion {
        start: o.start,
        end,
        duration_s: (end - o.start).num_milliseconds() as f64 / 1000.0,
        peak: o.worst.value,
        limit: o.worst.limit,
        unit: o.worst.unit,
        phase: o.worst.phase,
        constraint: o.worst.constraint,
        fail_safe: o.fail_safe,
    }
}

/// A compliance summary over a period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub count: usize,
    pub longest_s: f64,
    /// The excursion furthest over its limit, as a share of the limit's size.
    pub worst: Option<Excursion>,
    pub time_over_s: f64,
    pub fail_safe_events: usize,
    /// Excursions of `allowed_s` or longer.
    pub over_allowed: Vec<Excursion>,
    pub allowed_s: f64,
}

pub fn summarize(excursions: &[Excursion], allowed_s: f64) -> Summary {
    let excess = |e: &Excursion| (e.peak - e.limit) / e.limit.abs().max(1.0);
    Summary {
        count: excursions.len(),
        longest_s: excursions.iter().map(|e| e.duration_s).fold(0.0, f64::max),
        worst: excursions
            .iter()
            .max_by(|a, b| excess(a).total_cmp(&excess(b)))
            .cloned(),
        time_over_s: excursions.iter().map(|e| e.duration_s).sum(),
        fail_safe_events: excursions.iter().filter(|e| e.fail_safe).count(),
        over_allowed: excursions
            .iter()
            .filter(|e| e.duration_s >= allowed_s)
            .cloned()
            .collect(),
        allowed_s,
    }
}

/// The compliance summary as `ems report` prints it.
pub fn report_text(site: &str, s: &Summary, excursions: &[Excursion]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Export excursions at site {site}");
    let _ = writeln!(
        out,
        "  count {}, time over the limit {:.1} s, longest {:.1} s, with fail-safe acting {}",
        s.count, s.time_over_s, s.longest_s, s.fail_safe_events
    );
    if let Some(w) = &s.worst {
        let _ = writeln!(
            out,
            "  worst: {} — {:.1} {} over a limit of {:.1} {} ({}{}), {:.1} s",
            w.start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            w.peak,
            w.unit.unit(),
            w.limit,
            w.unit.unit(),
            w.constraint,
            w.phase
                .map_or(String::new(), |p| format!(", {}", p.as_str())),
            w.duration_s
        );
    }
    let _ = writeln!(
        out,
        "  {} or longer (flagged): {}",
        format_args!("{:.0} s", s.allowed_s),
        s.over_allowed.len()
    );
    if !excursions.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "  {:<24} {:>9} {:>11} {:>11} {:<5} {:<17} fail-safe",
            "start", "seconds", "peak", "limit", "phase", "constraint"
        );
        for e in excursions {
            let flag = if e.duration_s >= s.allowed_s {
                "  ← too long"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  {:<24} {:>9.1} {:>9.1} {} {:>9.1} {} {:<5} {:<17} {}{flag}",
                e.start.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                e.duration_s,
                e.peak,
                e.unit.unit(),
                e.limit,
                e.unit.unit(),
                e.phase.map_or("-", |p| p.as_str()),
                e.constraint,
                if e.fail_safe { "yes" } else { "no" },
            );
        }
    }
    out
}

/// The CSV header and rows the API serves with `Accept: text/csv`.
pub const CSV_HEADER: &str = "start,end,duration_s,peak,limit,unit,phase,constraint,fail_safe";

pub fn to_csv(excursions: &[Excursion]) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for e in excursions {
        let _ = writeln!(
            out,
            "{},{},{:.3},{:.3},{:.3},{},{},{},{}",
            e.start.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            e.end.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            e.duration_s,
            e.peak,
            e.limit,
            e.unit.unit(),
            e.phase.map_or("", |p| p.as_str()),
            e.constraint,
            e.fail_safe,
        );
    }
    out
}

/// Parse what [`to_csv`] wrote (for `ems report` over an export, and for tests).
pub fn from_csv(text: &str) -> Result<Vec<Excursion>, String> {
    let mut lines = text.lines();
    if lines.next() != Some(CSV_HEADER) {
        return Err(format!("expected the header `{CSV_HEADER}`"));
    }
    lines
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(k, line)| {
            let f: Vec<&str> = line.split(',').collect();
            let bad = || format!("line {}: not an excursion: {line}", k + 2);
            if f.len() != 9 {
                return Err(bad());
            }
            let time = |s: &str| {
                DateTime::parse_from_rfc3339(s)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| bad())
            };
            let num = |s: &str| s.parse::<f64>().map_err(|_| bad());
            Ok(Excursion {
                start: time(f[0])?,
                end: time(f[1])?,
                duration_s: num(f[2])?,
                peak: num(f[3])?,
                limit: num(f[4])?,
                unit: Quantity::parse(f[5]).ok_or_else(bad)?,
                phase: match f[6] {
                    "" => None,
                    "L1" => Some(Phase::L1),
                    "L2" => Some(Phase::L2),
                    "L3" => Some(Phase::L3),
                    _ => return Err(bad()),
                },
                constraint: f[7].to_string(),
                fail_safe: f[8] == "true",
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_750_000_000 + s, 0).unwrap()
    }

    const SITE: LimitInForce = LimitInForce {
        limit: GridLimit::Total(0.0),
        dr: false,
    };

    fn grid(export_w: f64) -> Vec<(Phase, f64, f64)> {
        Phase::ALL
            .iter()
            .map(|&p| (p, -export_w / 3.0, 230.0))
            .collect()
    }

    #[test]
    fn an_excursion_opens_over_the_limit_and_closes_at_the_first_cycle_within_it() {
        let mut w = ExcursionWatch::default();
        let mut done = Vec::new();
        for (s, export) in [
            (0, -100.0),
            (1, 500.0),
            (2, 900.0),
            (3, 200.0),
            (4, -50.0),
            (5, -50.0),
        ] {
            done.extend(w.observe(t(s), over_limit(&grid(export), &[SITE]), true, false));
        }
        assert_eq!(done.len(), 1);
        let e = &done[0];
        assert_eq!((e.start, e.end, e.duration_s), (t(1), t(4), 3.0));
        assert!((e.peak - 900.0).abs() < 1e-9);
        assert_eq!(e.constraint, "export_limit");
    }

    #[test]
    fn a_phase_current_limit_reports_the_phase_and_amperes() {
        let limits = [LimitInForce {
            limit: GridLimit::PhaseCurrent(16.0),
            dr: false,
        }];
        let g = vec![
            (Phase::L1, -2300.0, 230.0),
            (Phase::L2, -4600.0, 230.0),
            (Phase::L3, 100.0, 230.0),
        ];
        let o = over_limit(&g, &limits).unwrap();
        assert_eq!((o.phase, o.unit), (Some(Phase::L2), Quantity::Amperes));
        assert!((o.value - 20.0).abs() < 1e-9);
    }

    #[test]
    fn a_lost_reading_neither_opens_nor_closes_but_marks_fail_safe() {
        let mut w = ExcursionWatch::default();
        w.observe(t(0), over_limit(&grid(300.0), &[SITE]), true, false);
        assert!(w.observe(t(1), None, false, true).is_none());
        let e = w.observe(t(2), None, true, false).unwrap();
        assert!(e.fail_safe);
        assert_eq!(e.duration_s, 2.0);
    }

    #[test]
    fn csv_round_trips() {
        let mut w = ExcursionWatch::default();
        w.observe(t(0), over_limit(&grid(300.0), &[SITE]), true, false);
        let e = w.observe(t(2), None, true, false).unwrap();
        let back = from_csv(&to_csv(std::slice::from_ref(&e))).unwrap();
        assert_eq!(back, vec![e]);
    }
}
