//! Bit rot in a snapshot at rest, after its arrival: a shim preloaded into
//! a member flips one bit of each file it renames to a name ending in
//! `.snap`, right after the rename: in the first byte of the first
//! `SNAPSHOT_ROT_PATTERN` in the file if that is set, else in the middle. The member's transport checks
//! a received snapshot's size and CRC-32 as it writes it, then gives it that
//! name; what the shim damages has passed those checks, so only the store's
//! own checksum at restore can catch it. The shim says on stderr (the
//! member's log) which file and byte it damaged.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What the shim writes to stderr for each file it damaged.
pub const DAMAGED: &str = "snapshot-rot shim: flipped a bit";

const SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static void rot(const char *path) {
    size_t n = strlen(path);
    if (n < 5 || strcmp(path + n - 5, ".snap") != 0) return;
    int fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_RDWR | O_CLOEXEC);
    struct stat st;
    if (fd < 0) return;
    if (fstat(fd, &st) == 0 && st.st_size > 0) {
        off_t at = st.st_size / 2;
        const char *pattern = getenv("SNAPSHOT_ROT_PATTERN");
        if (pattern && *pattern) {
            char *bytes = malloc((size_t)st.st_size);
            if (!bytes || pread(fd, bytes, (size_t)st.st_size, 0) != st.st_size) {
                free(bytes); close(fd); return;
            }
            char *found = memmem(bytes, (size_t)st.st_size, pattern, strlen(pattern));
            free(bytes);
            if (!found) {
                static const char none[] = "snapshot-rot shim: the pattern is not in the snapshot\n";
                syscall(SYS_write, 2, none, sizeof none - 1);
                close(fd); return;
            }
            at = found - bytes;
        }
        unsigned char b;
        if (pread(fd, &b, 1, at) == 1) {
            b ^= 0x04;
            if (pwrite(fd, &b, 1, at) == 1) {
                char line[4200];
                int len = snprintf(line, sizeof line,
                    "snapshot-rot shim: flipped a bit at byte %lld of %s\n", (long long)at, path);
                if (len > 0) syscall(SYS_write, 2, line, (size_t)len);
            }
        }
    }
    close(fd);
}

int rename(const char *from, const char *to) {
    static int (*real)(const char *, const char *);
    if (!real) real = (int (*)(const char *, const char *))dlsym(RTLD_NEXT, "rename");
    int r = real(from, to);
    if (r == 0) rot(to);
    return r;
}

int renameat(int fromdir, const char *from, int todir, const char *to) {
    static int (*real)(int, const char *, int, const char *);
    if (!real) real = (int (*)(int, const char *, int, const char *))dlsym(RTLD_NEXT, "renameat");
    int r = real(fromdir, from, todir, to);
    /* Relative names only from the working directory. */
    if (r == 0 && (to[0] == '/' || todir == AT_FDCWD)) rot(to);
    return r;
}
"#;

/// Builds the shim in `dir`; None without a C compiler.
pub fn build_shim(dir: &Path) -> Option<PathBuf> {
    let source = dir.join("snapshot_rot.c");
    let library = dir.join("libsnapshot_rot.so");
    std::fs::write(&source, SHIM).ok()?;
    let built = Command::new("cc")
        .args(["-O2", "-shared", "-fPIC", "-o"])
        .arg(&library)
        .arg(&source)
        .arg("-ldl")
        .status()
        .is_ok_and(|s| s.success());
    built.then_some(library)
}

/// The environment that preloads the shim, damaging the first byte of
/// `pattern` if given, else the middle byte.
pub fn env(shim: &Path, pattern: Option<&str>) -> Vec<(String, String)> {
    let mut env = vec![("LD_PRELOAD".into(), shim.display().to_string())];
    if let Some(pattern) = pattern {
        env.push(("SNAPSHOT_ROT_PATTERN".into(), pattern.into()));
    }
    env
}
