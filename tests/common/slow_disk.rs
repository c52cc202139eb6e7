//! A slow disk for one member: a shim preloaded into it makes every
//! fdatasync sleep `SLOW_FDATASYNC_MS` first.

use std::path::Path;
use std::process::Command;

const SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <unistd.h>

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    const char *ms = getenv("SLOW_FDATASYNC_MS");
    if (ms) usleep((useconds_t)atoi(ms) * 1000);
    return real(fd);
}
"#;

/// Builds the shim in `dir`; None without a C compiler.
pub fn build_shim(dir: &Path) -> Option<std::path::PathBuf> {
    let source = dir.join("slow_fdatasync.c");
    let library = dir.join("libslow_fdatasync.so");
    std::fs::write(&source, SHIM).ok()?;
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&library)
        .arg(&source)
        .arg("-ldl")
        .status()
        .is_ok_and(|s| s.success());
    built.then_some(library)
}
