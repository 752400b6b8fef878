//! RS485 buses for the simulator: pairs of pseudo-terminals joined by socat, the EMS on one
//! end (master) and the simulated slaves on the other.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use tempfile::TempDir;

/// A pair of connected pseudo-terminals made by socat: what one end writes, the other
/// reads — an RS485 bus between the EMS (master) and the simulator (slaves).
pub struct PtyPair {
    pub master: PathBuf,
    pub slave: PathBuf,
    child: std::process::Child,
    _dir: TempDir,
}

impl PtyPair {
    /// Start socat; fails if it is not installed or ends before both ends exist.
    pub fn new() -> std::io::Result<PtyPair> {
        let dir = TempDir::new()?;
        let master = dir.path().join("master");
        let slave = dir.path().join("slave");
        let mut child = Command::new("socat")
            .arg("-d")
            .arg("-d")
            .arg(format!("pty,raw,echo=0,link={}", master.display()))
            .arg(format!("pty,raw,echo=0,link={}", slave.display()))
            .stderr(Stdio::piped())
            .spawn()?;
        let Some(stderr) = child.stderr.take() else {
            let _ = child.kill();
            return Err(std::io::Error::other("socat has no stderr"));
        };
        let mut lines = BufReader::new(stderr).lines();
        // socat says so once both ends exist.
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("starting data transfer loop") => break,
                Some(Ok(_)) => continue,
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(std::io::Error::other(
                        "socat ended before the ptys were ready",
                    ));
                }
            }
        }
        // Keep draining socat's log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(PtyPair {
            master,
            slave,
            child,
            _dir: dir,
        })
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
