//! `ems check`: shipped sites pass; broken files fail with file:line:col and a fix.

use std::path::Path;
use std::process::Command;

use site_ems::config::{ConfigError, SiteConfig};

const BASE: &str = r#"site:
  name: t
  timezone: Europe/Berlin
grid:
  phases: 3
export_limit:
  mode: total_power
  limit_w: 0
links:
  - name: lan1
    type: tcp
    host: 10.0.0.1
  - name: pair-a
    type: rtu
    device: /dev/ttyUSB0
    baud: 9600
meters:
  - id: grid
    role: grid
    model: dtsu666
    link: pair-a
    unit_id: 1
inverters:
"#;

fn inverter(id: &str, link: &str, unit: u8, model: &str) -> String {
    format!(
        "  - id: {id}\n    model: {model}\n    rated_power_w: 10000\n    phases: 3\n    link: {link}\n    unit_id: {unit}\n    battery:\n      capacity_wh: 10000\n      max_charge_w: 5000\n      max_discharge_w: 5000\n"
    )
}

fn errors(text: &str) -> Vec<ConfigError> {
    match SiteConfig::from_str("site.yaml", text) {
        Ok(_) => panic!("expected the file to be rejected:\n{text}"),
        Err(e) => e.0,
    }
}

/// Line (1-based) of the first occurrence of `needle` in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .expect("needle")
        + 1
}

#[test]
fn shipped_sites_pass_ems_check() {
    let sites: Vec<_> = std::fs::read_dir("sites")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(sites.len() >= 2, "expected the shipped example sites");
    let out = Command::new(env!("CARGO_BIN_EXE_ems"))
        .arg("check")
        .args(&sites)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ems check failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let demo = SiteConfig::load(Path::new("sites/demo.yaml")).unwrap();
    assert_eq!(demo.inverters.len(), 10);
}

#[test]
fn unknown_field_is_located_and_explained() {
    let text = format!("{BASE}{}", inverter("a", "lan1", 1, "saj-h2")).replace(
        "    unit_id: 1\n    battery",
        "    unit_id: 1\n    colour: red\n    battery",
    );
    let e = &errors(&text)[0];
    assert_eq!(e.line, line_of(&text, "colour"));
    assert_eq!(e.col, 5);
    assert!(
        e.message.contains("unknown field `colour`"),
        "{}",
        e.message
    );
    assert!(!e.hint.is_empty());
}

#[test]
fn wrong_type_is_located() {
    let text = format!("{BASE}{}", inverter("a", "lan1", 1, "saj-h2"))
        .replace("rated_power_w: 10000", "rated_power_w: lots");
    let e = &errors(&text)[0];
    assert_eq!(e.line, line_of(&text, "lots"));
    assert!(e.message.contains("invalid type"), "{}", e.message);
    assert!(e.to_string().starts_with(&format!("site.yaml:{}:", e.line)));
}

#[test]
fn eleven_inverters_on_a_lan_are_refused() {
    let mut text = BASE.replace(
        "links:\n",
        &(1..=11)
            .map(|i| format!("  - name: lan{i}x\n    type: tcp\n    host: 10.0.0.{i}\n"))
            .fold("links:\n".to_string(), |a, b| a + &b),
    );
    for i in 1..=11 {
        text += &inverter(&format!("inv{i}"), &format!("lan{i}x"), 1, "saj-h2");
    }
    let errs = errors(&text);
    let e = errs
        .iter()
        .find(|e| e.message.contains("11 inverters on the LAN"))
        .expect("LAN limit error");
    // Points at the eleventh inverter.
    assert_eq!(e.line, line_of(&text, "id: inv11"));
    assert!(e.hint.contains("split"));
}

#[test]
fn three_inverters_on_one_rs485_pair_are_refused() {
    let mut text = BASE.to_string();
    for i in 2..=4 {
        text += &inverter(&format!("inv{i}"), "pair-a", i, "saj-h2");
    }
    let errs = errors(&text);
    let e = errs
        .iter()
        .find(|e| e.message.contains("3 inverters on RS485 pair `pair-a`"))
        .expect("pair limit error");
    let third = line_of(&text, "id: inv4");
    assert_eq!(e.line, third + 4, "points at the third inverter's link");
}

#[test]
fn mixed_models_on_one_pair_are_refused() {
    let text = format!(
        "{BASE}{}{}",
        inverter("a", "pair-a", 2, "saj-h2"),
        inverter("b", "pair-a", 3, "saj-hs2")
    );
    assert!(errors(&text).iter().any(|e| e.message.contains("mixes")));
}

#[test]
fn duplicate_unit_id_on_a_link_is_refused() {
    let text = format!(
        "{BASE}{}{}",
        inverter("a", "pair-a", 2, "saj-h2"),
        inverter("b", "pair-a", 2, "saj-h2")
    );
    let errs = errors(&text);
    let e = errs
        .iter()
        .find(|e| {
            e.message
                .contains("unit id 2 on link `pair-a` is already used by `a`")
        })
        .expect("duplicate unit id error");
    assert_eq!(e.line, line_of(&text, "id: b") + 5);
    // The grid meter's address 1 is taken on that pair too.
    let text = format!("{BASE}{}", inverter("a", "pair-a", 1, "saj-h2"));
    assert!(errors(&text)
        .iter()
        .any(|e| e.message.contains("already used by `grid`")));
}

#[test]
fn meter_address_rules() {
    // Grid meter must be at 1.
    let text = format!("{BASE}{}", inverter("a", "lan1", 1, "saj-h2")).replace(
        "link: pair-a\n    unit_id: 1",
        "link: pair-a\n    unit_id: 3",
    );
    let errs = errors(&text);
    let e = errs
        .iter()
        .find(|e| e.message.contains("grid-side meter must be at address 1"))
        .expect("grid address error");
    assert_eq!(e.line, line_of(&text, "unit_id: 3"));
    assert!(e.hint.contains("unit_id: 1"));

    // PV meter must be at 2, and of the same kind as the grid meter.
    let pv = "  - id: pv\n    role: pv\n    model: ddsu666\n    link: pair-a\n    unit_id: 5\n";
    let text = format!("{BASE}{}", inverter("a", "lan1", 1, "saj-h2"))
        .replace("inverters:\n", &format!("{pv}inverters:\n"));
    let errs = errors(&text);
    assert!(errs
        .iter()
        .any(|e| e.message.contains("pv-side meter must be at address 2")));
    assert!(errs.iter().any(|e| e
        .message
        .contains("a 1-phase meter (ddsu666) on a 3-phase grid")));

    // No grid meter at all.
    let text = format!("{BASE}{}", inverter("a", "lan1", 1, "saj-h2"))
        .replace("    role: grid", "    role: pv");
    assert!(errors(&text)
        .iter()
        .any(|e| e.message.contains("no grid meter")));
}

#[test]
fn limit_and_reference_errors() {
    let text = format!("{BASE}{}", inverter("a", "nowhere", 1, "saj-h2"));
    let errs = errors(&text);
    assert!(errs
        .iter()
        .any(|e| e.message.contains("no link named `nowhere`") && e.hint.contains("lan1")));

    // A limit is parsed into its mode and the one value that mode takes: a value for the
    // other mode is refused at the mode.
    for (from, to, says) in [
        (
            "mode: total_power\n  limit_w: 0",
            "mode: phase_current\n  limit_w: 0",
            "needs `limit_a`",
        ),
        (
            "mode: total_power\n  limit_w: 0",
            "mode: total_power\n  limit_a: 40",
            "needs `limit_w`",
        ),
        (
            "mode: total_power\n  limit_w: 0",
            "mode: phase_power\n  limit_w: 0\n  limit_a: 40",
            "takes `limit_w` only",
        ),
    ] {
        let text = format!("{BASE}{}", inverter("a", "lan1", 1, "saj-h2")).replace(from, to);
        let e = &errors(&text)[0];
        assert!(e.message.contains(says), "{e}");
        assert_eq!(
            e.line,
            line_of(&text, "export_limit:") + 1,
            "at the mode: {e}"
        );
        assert!(e.hint.contains("limit_a (A per phase)"), "{e}");
    }
}

#[test]
fn ems_check_prints_file_line_col_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    let text = format!("{BASE}{}", inverter("a", "lan1", 1, "saj-h2"))
        .replace("timezone: Europe/Berlin", "timezone: Mars/Olympus");
    std::fs::write(&path, &text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ems"))
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!("{}:3:13: unknown timezone `Mars/Olympus`", path.display());
    assert!(stderr.contains(&want), "{stderr}");
    assert!(stderr.contains("fix: use an IANA timezone"), "{stderr}");
}

#[test]
fn readme_site_example_is_valid() {
    let whole = std::fs::read_to_string("README.md").unwrap();
    let readme = &whole[whole
        .find("## The site file")
        .expect("the site file section")..];
    let start = readme.find("```yaml\n").expect("a yaml example in README") + "```yaml\n".len();
    let end = start + readme[start..].find("```").unwrap();
    if let Err(e) = SiteConfig::from_str("README.md", &readme[start..end]) {
        panic!("README example is invalid:\n{e}");
    }
}

#[test]
fn load_forecast_sources_are_checked_in_the_site_file() {
    let demo = std::fs::read_to_string("sites/demo.yaml").unwrap();
    let profile_start = demo.find("    profile_w:").unwrap();
    let profile_end = profile_start + demo[profile_start..].find('\n').unwrap();
    let with = |load: &str, extra: &str| {
        format!(
            "{}{load}{}{extra}",
            &demo[..profile_start],
            &demo[profile_end..]
        )
    };
    // History alone, with a store: valid.
    SiteConfig::from_str(
        "s.yaml",
        &with("    history_weeks: 4", "store:\n  path: ems.sqlite\n"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // History without a store: refused, at the field, with the fix.
    let text = with("    history_weeks: 4", "");
    let e = errors(&text);
    let e = e
        .iter()
        .find(|e| e.message.contains("needs the store"))
        .expect("store error");
    assert_eq!(e.line, line_of(&text, "history_weeks"));
    assert!(e.hint.contains("store:"));
    // A CSV and a profile together: refused.
    let text = with("    csv: load.csv\n    profile_w: [1, 2]", "");
    assert!(errors(&text)
        .iter()
        .any(|e| e.message.contains("load_forecast needs")));
}

/// `text` with `{v}` replaced by `v` and its line marked `# here`.
fn mark(text: &str, v: &str) -> String {
    text.lines()
        .map(|l| {
            if l.contains("{v}") {
                format!("{} # here\n", l.replace("{v}", v))
            } else {
                format!("{l}\n")
            }
        })
        .collect()
}

/// A planner section with `{v}` in place of `field`'s value.
fn planner_with(field: &str) -> String {
    let v = |name: &str, good: &str| {
        if name == field {
            "{v}".to_string()
        } else {
            good.to_string()
        }
    };
    let profile = if field == "profile_w" {
        format!("[{{v}}, {}]", ["1000"; 23].join(", "))
    } else {
        format!("[{}]", ["1000"; 24].join(", "))
    };
    format!(
        "planner:\n  horizon_h: {}\n  replan_min: {}\n  solve_time_limit_s: {}\n  cycling_cost_per_kwh: {}\n  soc_penalty_per_kwh: {}\n  terminal_value_per_kwh: {}\n  import_price:\n    tou:\n      default: {}\n      periods:\n        - {{ start: \"00:30\", end: \"04:30\", price: {} }}\n  export_price:\n    tou: {{ default: 0.1 }}\n  pv_forecast:\n    peak_w: {}\n  load_forecast:\n    profile_w: {profile}\n",
        v("horizon_h", "24"),
        v("replan_min", "15"),
        v("solve_time_limit_s", "5"),
        v("cycling_cost_per_kwh", "0.01"),
        v("soc_penalty_per_kwh", "1"),
        v("terminal_value_per_kwh", "0.1"),
        v("default", "0.3"),
        v("price", "0.08"),
        v("peak_w", "10000"),
    )
}

#[test]
fn nan_infinity_and_out_of_range_numbers_are_refused_where_they_stand() {
    let base = format!("{BASE}{}", inverter("a", "lan1", 1, "saj-h2"));
    let appended = |section: String| {
        let base = base.clone();
        move |v: &str| mark(&format!("{base}{section}"), v)
    };
    // (what, how to put a value in the file, a value out of range)
    type Make = Box<dyn Fn(&str) -> String>;
    let mut cases: Vec<(String, Make, &str)> = Vec::new();
    for (field, oor) in [
        ("fail_safe_after_s", "9"),
        ("stale_after_s", "0"),
        ("grid_margin_w", "-1"),
        ("ramp_pct_per_s", "0"),
        ("deadband_w", "99999"),
        ("frozen_after_s", "1"),
        ("deadband_pct", "21"),
        ("min_write_interval_s", "-1"),
        ("direction_dwell_s", "4000"),
        ("follow_after_s", "1"),
        ("follow_tolerance_pct", "0"),
    ] {
        cases.push((
            format!("control.{field}"),
            Box::new(appended(format!("control:\n  {field}: {{v}}\n"))),
            oor,
        ));
    }
    for (field, oor) in [
        ("time_factor", "-1"),
        ("base_load_w", "-1"),
        ("peak_load_w", "-5"),
        ("load_noise_pct", "500"),
        ("pv_peak_ratio", "-1"),
        ("ac_pv_peak_w", "-1"),
        ("initial_soc_pct", "101"),
        ("ramp_pct_per_s", "-2"),
    ] {
        cases.push((
            format!("simulation.{field}"),
            Box::new(appended(format!("simulation:\n  {field}: {{v}}\n"))),
            oor,
        ));
    }
    cases.push((
        "simulation.load_phase_shares".into(),
        Box::new(appended(
            "simulation:\n  load_phase_shares: [{v}, 0.3, 0.3]\n".into(),
        )),
        "-0.5",
    ));
    for (field, oor) in [
        ("heartbeat_s", "0"),
        ("telemetry_s", "-1"),
        ("fallback: { export_limit_w", "-1"),
    ] {
        let close = if field.contains('{') { " }" } else { "" };
        cases.push((
            format!("dr.mqtt.{field}"),
            Box::new(appended(format!(
                "dr:\n  mqtt:\n    host: localhost\n    topic_prefix: site\n    insecure: true\n    {field}: {{v}}{close}\n"
            ))),
            oor,
        ));
    }
    cases.push((
        "dr.openadr_levels".into(),
        Box::new(appended(
            "dr:\n  openadr_levels:\n    - { import_limit_w: {v} }\n    - {}\n    - {}\n    - {}\n"
                .into(),
        )),
        "-100",
    ));
    for field in [
        "horizon_h",
        "replan_min",
        "solve_time_limit_s",
        "cycling_cost_per_kwh",
        "soc_penalty_per_kwh",
        "terminal_value_per_kwh",
        "default",
        "price",
        "peak_w",
        "profile_w",
    ] {
        let base = base.clone();
        cases.push((
            format!("planner.{field}"),
            Box::new(move |v: &str| mark(&format!("{base}{}", planner_with(field)), v)),
            "-1e9",
        ));
    }
    let edit = |from: &'static str, to: &'static str| {
        let base = base.clone();
        move |v: &str| mark(&base.replacen(from, to, 1), v)
    };
    cases.push((
        "grid.nominal_voltage_v".into(),
        Box::new(edit(
            "  phases: 3\nexport",
            "  phases: 3\n  nominal_voltage_v: {v}\nexport",
        )),
        "1000",
    ));
    cases.push((
        "export_limit.limit_w".into(),
        Box::new(edit("  limit_w: 0", "  limit_w: {v}")),
        "-5",
    ));
    cases.push((
        "links.gap_ms".into(),
        Box::new(edit(
            "    baud: 9600\n",
            "    baud: 9600\n    gap_ms: {v}\n",
        )),
        "5000",
    ));
    cases.push((
        "inverters.rated_power_w".into(),
        Box::new(edit("rated_power_w: 10000", "rated_power_w: {v}")),
        "0",
    ));
    cases.push((
        "battery.capacity_wh".into(),
        Box::new(edit("capacity_wh: 10000", "capacity_wh: {v}")),
        "-1",
    ));
    cases.push((
        "battery.charge_efficiency".into(),
        Box::new(edit(
            "      max_discharge_w: 5000\n",
            "      max_discharge_w: 5000\n      charge_efficiency: {v}\n",
        )),
        "1.5",
    ));
    cases.push((
        "working_mode.reserve_soc_pct".into(),
        Box::new(appended(
            "working_mode:\n  mode: backup\n  reserve_soc_pct: {v}\n".into(),
        )),
        "101",
    ));
    cases.push((
        "working_mode.periods.power_w".into(),
        Box::new(appended(
            "working_mode:\n  mode: time_of_use\n  periods:\n    - { kind: charge, start: \"01:00\", end: \"02:00\", power_w: {v} }\n".into(),
        )),
        "-1",
    ));
    let mut checked = 0;
    for (what, make, oor) in &cases {
        for v in [".nan", ".inf", "-.inf", oor] {
            let text = make(v);
            let errs = errors(&text);
            let line = line_of(&text, "# here");
            assert!(
                errs.iter().any(|e| e.line == line && !e.hint.is_empty()),
                "{what} = {v}: no error at line {line}: {errs:?}\n{text}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 4 * 35, "{checked}");
}

#[test]
fn contact_addresses_at_both_ends_of_the_range_are_refused_without_overflow() {
    let text = format!(
        "{BASE}{}dr:\n  contacts:\n    link: lan1\n    unit_id: 5\n    drm_inputs: [0, 1, 2, 3, 4, 5, 6, 7, 65535]\n",
        inverter("a", "lan1", 1, "saj-h2")
    );
    let errs = errors(&text);
    assert!(
        errs.iter()
            .any(|e| e.message.contains("span more than") && e.line >= line_of(&text, "contacts:")),
        "{errs:?}"
    );
}

#[test]
fn a_fail_safe_budget_over_5_s_is_refused() {
    // 4 s + a 2 s cycle + the meter's 1 s RS485 timeout: 7 s without a safe site.
    let text = format!(
        "{BASE}{}control:\n  cycle_ms: 2000\n  fail_safe_after_s: 4\n",
        inverter("a", "lan1", 1, "saj-h2")
    );
    let errs = errors(&text);
    let e = errs
        .iter()
        .find(|e| e.message.contains("more than 5 s"))
        .unwrap_or_else(|| panic!("{errs:?}"));
    assert_eq!(e.line, line_of(&text, "fail_safe_after_s"));
    assert!(e.hint.contains("timeout_ms"), "{}", e.hint);
    // The same with a 1 s cycle and a 0.5 s timeout passes.
    let ok = format!(
        "{BASE}{}control:\n  cycle_ms: 1000\n  fail_safe_after_s: 3\n",
        inverter("a", "lan1", 1, "saj-h2")
    )
    .replace("    baud: 9600\n", "    baud: 9600\n    timeout_ms: 500\n");
    SiteConfig::from_str("site.yaml", &ok).unwrap();
}

#[test]
fn release_on_stop_needs_a_store_to_keep_the_units_own_settings() {
    let text = format!(
        "{BASE}{}control:\n  on_stop: release\n",
        inverter("a", "lan1", 1, "saj-h2")
    );
    let errs = errors(&text);
    let e = errs
        .iter()
        .find(|e| e.message.contains("on_stop: release"))
        .unwrap_or_else(|| panic!("{errs:?}"));
    assert_eq!(e.line, line_of(&text, "on_stop"));
    assert!(e.hint.contains("store"), "{}", e.hint);
    let ok = format!("{text}store:\n  path: ems.sqlite\n");
    SiteConfig::from_str("site.yaml", &ok).unwrap();
}

#[test]
fn follow_time_shorter_than_the_write_interval_is_refused() {
    let text = format!(
        "{BASE}{}control:\n  min_write_interval_s: 60\n  follow_after_s: 30\n",
        inverter("a", "lan1", 1, "saj-h2")
    );
    let errs = errors(&text);
    let e = errs
        .iter()
        .find(|e| e.message.contains("min_write_interval_s"))
        .unwrap_or_else(|| panic!("{errs:?}"));
    assert_eq!(e.line, line_of(&text, "follow_after_s"));
}

#[test]
fn a_bad_time_of_day_is_located_and_explained() {
    let text = format!(
        "{BASE}{}working_mode:\n  mode: time_of_use\n  periods:\n    - {{ kind: charge, start: \"22:00\", end: \"6:00\" }}\n",
        inverter("a", "lan1", 1, "saj-h2")
    );
    let e = &errors(&text)[0];
    assert_eq!(e.line, line_of(&text, "6:00\" }"));
    assert!(
        e.message.contains("`6:00` is not a time of day"),
        "{}",
        e.message
    );
    assert!(e.hint.contains("HH:MM"), "{}", e.hint);
}

#[test]
fn mqtt_without_tls_and_a_login_is_refused_unless_marked_insecure() {
    let mqtt = "dr:\n  mqtt:\n    host: broker.example\n    topic_prefix: fleet/site-1\n";
    let text = format!("{BASE}{}{mqtt}", inverter("a", "lan1", 1, "saj-h2"));
    let e = &errors(&text)[0];
    assert_eq!(e.line, line_of(&text, "host: broker.example"));
    assert!(
        e.message
            .contains("ca_file, username, password_env missing"),
        "{}",
        e.message
    );
    assert!(e.hint.contains("insecure: true"), "{}", e.hint);

    // Through `ems check`: refused with file:line:col; allowed with `insecure: true`, warned.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("site.yaml");
    std::fs::write(&file, &text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ems"))
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("site.yaml:{}:", e.line)),
        "{stderr}"
    );
    std::fs::write(&file, format!("{text}    insecure: true\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ems"))
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning:") && stderr.contains("insecure"),
        "{stderr}"
    );
}

#[test]
fn a_value_refused_by_its_type_is_located_at_the_value_not_its_mapping() {
    let text = format!(
        "{BASE}{}working_mode:\n  mode: time_of_use\n  periods:\n    - kind: charge\n      start: \"22:00\"\n      end: \"6:00\"\n",
        inverter("a", "lan1", 1, "saj-h2")
    );
    let e = &errors(&text)[0];
    let line = line_of(&text, "end: \"6:00\"");
    let col = text.lines().nth(line - 1).unwrap().find("6:00").unwrap() + 1;
    assert_eq!((e.line, e.col), (line, col), "{}", e.message);
    assert!(
        e.message.starts_with("`6:00` is not a time of day"),
        "{}",
        e.message
    );
}

#[test]
fn sunspec_entries_are_checked_like_the_others() {
    let pv = |id: &str, extra: &str| {
        format!(
            "  - id: {id}\n    model: sunspec\n    rated_power_w: 8000\n    phases: 3\n    link: lan1\n    unit_id: 1\n{extra}"
        )
    };
    // A PV-only SunSpec unit needs no battery; a SunSpec meter sits at any address.
    let ok = format!(
        "{}{}",
        BASE.replace("model: dtsu666", "model: sunspec")
            .replace("unit_id: 1\ninverters:", "unit_id: 240\ninverters:"),
        pv("pv1", "")
    );
    SiteConfig::from_str("site.yaml", &ok).unwrap_or_else(|e| panic!("{e:?}"));

    // A misspelt model is located at its value, with the models that exist.
    let text = format!("{BASE}{}", pv("pv1", "").replace("sunspec", "sunspek"));
    let e = &errors(&text)[0];
    assert_eq!(e.line, line_of(&text, "sunspek"));
    assert!(e.to_string().contains("sunspec"), "{e}");

    // A rating that is no rating.
    let text = format!("{BASE}{}", pv("pv1", "").replace("8000", "-8000"));
    let e = &errors(&text)[0];
    assert_eq!(e.line, line_of(&text, "-8000"));

    // An SAJ hybrid without its battery is refused; a SunSpec unit's battery is checked.
    let hybrid = inverter("h1", "lan1", 1, "saj-h2");
    let no_battery = hybrid.split("    battery:").next().unwrap().to_string();
    let text = format!("{BASE}{no_battery}");
    let e = &errors(&text)[0];
    assert_eq!(e.line, line_of(&text, "id: h1"));
    assert!(e.hint.contains("battery"), "{e}");
    let text = format!(
        "{BASE}{}",
        pv("pv1", "    battery:\n      capacity_wh: 0\n      max_charge_w: 5000\n      max_discharge_w: 5000\n")
    );
    let e = &errors(&text)[0];
    assert_eq!(e.line, line_of(&text, "capacity_wh: 0"));
}
