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
#include <signal.h>
#include <stdarg.h>
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
            off_t found_at = found ? (off_t)(found - bytes) : -1;
            free(bytes);
            if (found_at < 0) {
                static const char none[] = "snapshot-rot shim: the pattern is not in the snapshot\n";
                syscall(SYS_write, 2, none, sizeof none - 1);
                close(fd); return;
            }
            at = found_at;
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

/* With SNAPSHOT_ROT_KILL set, the process dies (SIGKILL) instead as it
   opens a received snapshot to read it: once raft has reset its log to
   the snapshot, before the store has restored it. */
static void die_if_reading_a_snapshot(const char *path, int flags) {
    size_t n = strlen(path);
    if (!getenv("SNAPSHOT_ROT_KILL") || (flags & O_ACCMODE) != O_RDONLY) return;
    if (n < 5 || strcmp(path + n - 5, ".snap") != 0) return;
    static const char dying[] = "snapshot-rot shim: killed as the snapshot is opened\n";
    syscall(SYS_write, 2, dying, sizeof dying - 1);
    kill(getpid(), SIGKILL);
}

/* The mode is there only with O_CREAT or O_TMPFILE. */
#define MODE(flags) \
    mode_t mode = 0; \
    if ((flags) & (O_CREAT | O_TMPFILE)) { \
        va_list ap; va_start(ap, flags); mode = (mode_t)va_arg(ap, unsigned); va_end(ap); \
    }

int open(const char *path, int flags, ...) {
    MODE(flags)
    static int (*real)(const char *, int, ...);
    if (!real) real = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, "open");
    die_if_reading_a_snapshot(path, flags);
    return real(path, flags, mode);
}
int open64(const char *path, int flags, ...) {
    MODE(flags)
    static int (*real)(const char *, int, ...);
    if (!real) real = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, "open64");
    die_if_reading_a_snapshot(path, flags);
    return real(path, flags, mode);
}
int openat(int dir, const char *path, int flags, ...) {
    MODE(flags)
    static int (*real)(int, const char *, int, ...);
    if (!real) real = (int (*)(int, const char *, int, ...))dlsym(RTLD_NEXT, "openat");
    die_if_reading_a_snapshot(path, flags);
    return real(dir, path, flags, mode);
}
int openat64(int dir, const char *path, int flags, ...) {
    MODE(flags)
    static int (*real)(int, const char *, int, ...);
    if (!real) real = (int (*)(int, const char *, int, ...))dlsym(RTLD_NEXT, "openat64");
    die_if_reading_a_snapshot(path, flags);
    return real(dir, path, flags, mode);
}

int rename(const char *from, const char *to) {
    static int (*real)(const char *, const char *);
    if (!real) real = (int (*)(const char *, const char *))dlsym(RTLD_NEXT, "rename");
    int r = real(from, to);
    if (r == 0 && !getenv("SNAPSHOT_ROT_KILL")) rot(to);
    return r;
}

int renameat(int fromdir, const char *from, int todir, const char *to) {
    static int (*real)(int, const char *, int, const char *);
    if (!real) real = (int (*)(int, const char *, int, const char *))dlsym(RTLD_NEXT, "renameat");
    int r = real(fromdir, from, todir, to);
    /* Relative names only from the working directory. */
    if (r == 0 && !getenv("SNAPSHOT_ROT_KILL") && (to[0] == '/' || todir == AT_FDCWD)) rot(to);
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

/// What the shim writes to stderr as it kills the member (see `env_killing`).
pub const KILLED: &str = "snapshot-rot shim: killed as the snapshot is opened";

/// The environment that preloads the shim to kill the member as it opens a
/// received snapshot to restore it (after raft reset its log to it), and
/// damage nothing.
pub fn env_killing(shim: &Path) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), shim.display().to_string()),
        ("SNAPSHOT_ROT_KILL".into(), "1".into()),
    ]
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
