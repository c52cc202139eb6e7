//! Wall clocks that jump, for one member at a time: libfaketime (Debian's
//! `faketime`) preloaded into the member, its offset read from a file on
//! every call, its monotonic clock left real, as a clock stepped by NTP or
//! an operator would leave it.

use std::path::PathBuf;
use std::process::Command;

/// Where Debian installs the preload library; None when it is not.
pub fn library() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// `date`'s UTC minute `offset` from now ("+10 min"), as a member's log
/// prints it.
pub fn minute(offset: &str) -> String {
    let out = Command::new("date")
        .args(["-u", "-d", offset, "+%Y-%m-%dT%H:%M"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One member's clock: the file its offset is read from.
pub struct FakeClock {
    library: PathBuf,
    dir: tempfile::TempDir,
}

impl FakeClock {
    /// A clock that starts at the right time; None without libfaketime.
    pub fn new() -> Option<FakeClock> {
        let clock = FakeClock {
            library: library()?,
            dir: tempfile::tempdir().expect("a temp dir"),
        };
        clock.set("+0");
        Some(clock)
    }

    /// Moves the clock to `offset` from the real time (libfaketime's
    /// syntax: "+10m", "-10m", "+0").
    pub fn set(&self, offset: &str) {
        std::fs::write(self.dir.path().join("offset"), offset).expect("write the offset");
    }

    /// The environment that makes a member's clock this one.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("LD_PRELOAD".into(), self.library.display().to_string()),
            (
                "FAKETIME_TIMESTAMP_FILE".into(),
                self.dir.path().join("offset").display().to_string(),
            ),
            ("FAKETIME_NO_CACHE".into(), "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ]
    }
}
