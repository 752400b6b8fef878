//! Independent references written in Python: a script reads a JSON document on stdin and
//! prints its answer as JSON.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

/// Debian's python3, with python3-scipy from apt (`tests/run` installs it), not a
/// virtualenv's.
pub const DEBIAN_PYTHON: &str = "/usr/bin/python3";

/// Run `script` (relative to the crate) with `python`, `input` on its stdin; its JSON answer.
pub fn answer(python: &Path, script: &str, input: &Value) -> Value {
    let mut child = Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(script))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{} for {script}: {e}", python.display()));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.to_string().as_bytes())
        .expect("write the reference's input");
    let out = child.wait_with_output().expect("the reference runs");
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{script}: not JSON: {e}"))
}

/// A virtualenv under the target directory holding `package` from PyPI (importable as
/// `module`), made on first use; its python. Tests of one binary that ask at once wait for
/// the first to finish making it.
pub fn venv_python(name: &str, package: &str, module: &str) -> std::path::PathBuf {
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let python = dir.join("bin/python");
    let has = |p: &Path| {
        Command::new(p)
            .args(["-c", &format!("import {module}")])
            .status()
            .is_ok_and(|s| s.success())
    };
    if python.exists() && has(&python) {
        return python;
    }
    let venv = Command::new(DEBIAN_PYTHON)
        .args(["-m", "venv"])
        .arg(&dir)
        .status()
        .expect("python3 (apt-get install python3-venv)");
    assert!(
        venv.success(),
        "python3 -m venv failed (apt-get install python3-venv)"
    );
    let pip = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", package])
        .status()
        .expect("pip in the virtualenv");
    assert!(
        pip.success(),
        "pip install {package} failed (needs the PyPI registry)"
    );
    python
}
