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
    let text = format!("{BASE}{}", inverter("a", "nowhere", 1, "saj-h2")).replace(
        "mode: total_power\n  limit_w: 0",
        "mode: phase_current\n  limit_w: 0",
    );
    let errs = errors(&text);
    assert!(errs
        .iter()
        .any(|e| e.message.contains("no link named `nowhere`") && e.hint.contains("lan1")));
    assert!(errs.iter().any(|e| e.message.contains("needs `limit_a`")));
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
    let readme = std::fs::read_to_string("README.md").unwrap();
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
