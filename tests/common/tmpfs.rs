//! Small tmpfs mounts, to fill a member's disk: mounted on a temporary
//! directory of their own (a member's data dir links there), resized with
//! `mount -o remount`, and unmounted on drop (lazily, so a process still
//! writing there does not keep it mounted), whatever the test did.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Tmpfs {
    path: PathBuf,
    /// Removed once unmounted (fields drop after `Drop::drop`).
    _dir: tempfile::TempDir,
}

/// Why tmpfs tests cannot run here (not root, or mounting is refused, as in
/// an unprivileged container); None when they can.
pub fn unavailable() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root: mounting a tmpfs needs root".into());
    }
    Tmpfs::mount("1m").err()
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount's syntax: "48m") on a new temporary
    /// directory.
    pub fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("create a temp dir: {e}"))?;
        let path = dir.path();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs at {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            path: path.to_owned(),
            _dir: dir,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `link` (a member's data dir, not created yet) point here.
    pub fn link_from(&self, link: &Path) {
        std::os::unix::fs::symlink(&self.path, link)
            .unwrap_or_else(|e| panic!("link {} to {}: {e}", link.display(), self.path.display()));
    }

    /// Grows (or shrinks) the filesystem to `size`, keeping its files.
    pub fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .output()
            .unwrap_or_else(|e| panic!("run mount: {e}"));
        assert!(
            out.status.success(),
            "remount {} with size {size}: {}",
            self.path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
