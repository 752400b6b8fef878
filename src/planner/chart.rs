//! A picture of a plan: prices above, planned battery and grid power below, one column per
//! step. Plain SVG, so any browser shows it.

use std::fmt::Write;

use super::Plan;

const W: f64 = 960.0;
const H: f64 = 480.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP_H: f64 = 160.0;
const GAP: f64 = 40.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The plan as an SVG document.
pub fn svg(plan: &Plan, title: &str) -> String {
    let n = plan.steps.len().max(1);
    let plot_w = W - LEFT - RIGHT;
    let x = |k: f64| LEFT + plot_w * k / n as f64;
    let mut out = String::new();
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"##
    );
    let _ = write!(out, r##"<rect width="{W}" height="{H}" fill="#ffffff"/>"##);
    let _ = write!(
        out,
        r##"<text x="{LEFT}" y="18" font-size="14">{} — cost {:.2}, without batteries {:.2}</text>"##,
        esc(title),
        plan.cost,
        plan.baseline_cost
    );

    // Prices.
    let prices = plan
        .steps
        .iter()
        .flat_map(|s| [s.import_price, s.export_price]);
    let (p_lo, p_hi) = prices.fold((0.0f64, 0.0f64), |(lo, hi), p| (lo.min(p), hi.max(p)));
    let p_span = (p_hi - p_lo).max(1e-9);
    let top = 30.0;
    let py = |p: f64| top + TOP_H * (1.0 - (p - p_lo) / p_span);
    for (name, colour, f) in [
        (
            "import price",
            "#c0392b",
            (|s: &super::PlanStep| s.import_price) as fn(&super::PlanStep) -> f64,
        ),
        ("export price", "#2980b9", |s: &super::PlanStep| {
            s.export_price
        }),
    ] {
        let points: Vec<String> = plan
            .steps
            .iter()
            .enumerate()
            .flat_map(|(k, s)| {
                let y = py(f(s));
                [
                    format!("{:.1},{y:.1}", x(k as f64)),
                    format!("{:.1},{y:.1}", x(k as f64 + 1.0)),
                ]
            })
            .collect();
        let _ = write!(
            out,
            r##"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"><title>{name}</title></polyline>"##,
            points.join(" ")
        );
    }
    let _ = write!(
        out,
        r##"<text x="4" y="{:.1}">{p_hi:.3}</text><text x="4" y="{:.1}">{p_lo:.3}</text>"##,
        top + 10.0,
        top + TOP_H
    );
    let _ = write!(
        out,
        r##"<text x="{:.1}" y="{:.1}" fill="#c0392b">import</text><text x="{:.1}" y="{:.1}" fill="#2980b9">export price per kWh</text>"##,
        W - 260.0,
        top + 12.0,
        W - 205.0,
        top + 12.0
    );

    // Battery (bars, + discharge) and grid (line, + import).
    let bottom_top = top + TOP_H + GAP;
    let bottom_h = H - bottom_top - 25.0;
    let battery: Vec<f64> = plan
        .steps
        .iter()
        .map(|s| s.batteries.iter().map(|b| b.power_w).sum())
        .collect();
    let w_max = battery
        .iter()
        .copied()
        .chain(plan.steps.iter().map(|s| s.grid_w))
        .fold(1.0f64, |m, v| m.max(v.abs()));
    let zero = bottom_top + bottom_h / 2.0;
    let wy = |w: f64| zero - (bottom_h / 2.0) * w / w_max;
    let _ = write!(
        out,
        r##"<line x1="{LEFT}" x2="{:.1}" y1="{zero:.1}" y2="{zero:.1}" stroke="#888"/>"##,
        W - RIGHT
    );
    for (k, b) in battery.iter().enumerate() {
        let (y0, y1) = (wy(*b).min(zero), wy(*b).max(zero));
        let colour = if *b >= 0.0 { "#27ae60" } else { "#8e44ad" };
        let _ = write!(
            out,
            r##"<rect x="{:.1}" y="{y0:.1}" width="{:.1}" height="{:.1}" fill="{colour}"><title>{}: battery {b:.0} W</title></rect>"##,
            x(k as f64),
            (plot_w / n as f64 * 0.9).max(0.5),
            (y1 - y0).max(0.0),
            esc(&plan.steps[k].start)
        );
    }
    let grid: Vec<String> = plan
        .steps
        .iter()
        .enumerate()
        .map(|(k, s)| format!("{:.1},{:.1}", x(k as f64 + 0.5), wy(s.grid_w)))
        .collect();
    let _ = write!(
        out,
        r##"<polyline fill="none" stroke="#34495e" stroke-width="1.2" points="{}"><title>grid power (+ import)</title></polyline>"##,
        grid.join(" ")
    );
    let _ = write!(
        out,
        r##"<text x="4" y="{:.1}">{:.0} kW</text><text x="4" y="{:.1}">-{:.0} kW</text>"##,
        bottom_top + 10.0,
        w_max / 1000.0,
        bottom_top + bottom_h,
        w_max / 1000.0
    );
    let _ = write!(
        out,
        r##"<text x="{LEFT}" y="{:.1}" fill="#27ae60">battery discharge</text><text x="{:.1}" y="{:.1}" fill="#8e44ad">charge</text><text x="{:.1}" y="{:.1}" fill="#34495e">grid (+ import)</text>"##,
        H - 8.0,
        LEFT + 120.0,
        H - 8.0,
        LEFT + 180.0,
        H - 8.0
    );
    if let (Some(first), Some(last)) = (plan.steps.first(), plan.steps.last()) {
        let _ = write!(
            out,
            r##"<text x="{LEFT}" y="{:.1}">{}</text><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            bottom_top - 8.0,
            esc(&first.start),
            W - RIGHT,
            bottom_top - 8.0,
            esc(&last.start)
        );
    }
    out.push_str("</svg>\n");
    out
}
