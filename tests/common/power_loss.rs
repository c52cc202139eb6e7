//! Power loss for a member: a shim preloaded into it keeps, for every
//! regular file it fsyncs or fdatasyncs, a copy of the file as that sync
//! made it durable (in `CAIRN_DURABLE_DIR`, named by device and inode, so
//! renames keep it); `lose_power` then puts back in the member's data
//! directory, once the process is killed, what a machine that lost its
//! power would find there: what was synced, and of what was written after,
//! a random prefix of the changed sectors (or none).
//!
//! The shim tracks, per inode, the span written since the last sync (write,
//! pwrite, writev and pwritev), and copies only that span at the next sync,
//! so the copies cost what was written; a file that was never synced is
//! either gone or holds a prefix of its sectors.
//!
//! Directory entries are durable only once their directory is synced, as
//! POSIX has it and as ext4 can leave them: at each fsync of a directory
//! the shim keeps a list of its entries (name and inode). At the power
//! loss, each entry made since (a file or directory created, or renamed
//! into place) is kept or lost at random: a lost new name vanishes with
//! what it holds, a lost rename goes back to the old name (and a file it
//! had replaced comes back from its durable copy). A name deleted since
//! the last sync stays deleted: the model does not bring files back.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const SHIM: &str = r#"
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

/* The span of each regular file written since its last sync, by inode. */
#define SLOTS 65536
struct span { dev_t dev; ino_t ino; off_t lo, hi; int used; };
static struct span spans[SLOTS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static struct span *slot(dev_t dev, ino_t ino) {
    size_t h = (size_t)((ino * 0x9e3779b97f4a7c15ull) ^ dev) % SLOTS;
    for (size_t k = 0; k < SLOTS; k++) {
        struct span *s = &spans[(h + k) % SLOTS];
        if (!s->used) { s->used = 1; s->dev = dev; s->ino = ino; s->lo = s->hi = 0; return s; }
        if (s->dev == dev && s->ino == ino) return s;
    }
    /* Not stdio: its write would come back here, lock held. */
    static const char full[] = "power-loss shim: too many files\n";
    syscall(SYS_write, 2, full, sizeof full - 1);
    abort();
}

static void note(int fd, off_t off, ssize_t n) {
    struct stat st;
    if (n <= 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return;
    pthread_mutex_lock(&lock);
    struct span *s = slot(st.st_dev, st.st_ino);
    if (s->lo == s->hi) { s->lo = off; s->hi = off + n; }
    else { if (off < s->lo) s->lo = off; if (off + n > s->hi) s->hi = off + n; }
    pthread_mutex_unlock(&lock);
}

/* After a sync of fd: its durable copy gets the span written since. */
static void keep(int fd) {
    const char *dir = getenv("CAIRN_DURABLE_DIR");
    struct stat st;
    if (!dir || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return;
    pthread_mutex_lock(&lock);
    struct span *s = slot(st.st_dev, st.st_ino);
    off_t lo = s->lo, hi = s->hi;
    s->lo = s->hi = 0;
    pthread_mutex_unlock(&lock);
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%lu-%lu", dir, (unsigned long)st.st_dev, (unsigned long)st.st_ino);
    int out = (int)syscall(SYS_openat, AT_FDCWD, path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    if (out < 0) { perror("power-loss shim: open a durable copy"); abort(); }
    if (ftruncate(out, st.st_size) != 0) { perror("power-loss shim: size a durable copy"); abort(); }
    if (hi > st.st_size) hi = st.st_size;
    /* fd may be open for writing only: read through a new descriptor. */
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
    int in = (int)syscall(SYS_openat, AT_FDCWD, self, O_RDONLY | O_CLOEXEC);
    if (in < 0) { perror("power-loss shim: reopen a synced file"); abort(); }
    static __thread char buf[1 << 16];
    for (off_t at = lo; at < hi;) {
        size_t want = (size_t)(hi - at) < sizeof buf ? (size_t)(hi - at) : sizeof buf;
        ssize_t got = pread(in, buf, want, at);
        if (got <= 0) break;
        if (syscall(SYS_pwrite64, out, buf, (size_t)got, at) != got) {
            perror("power-loss shim: write a durable copy"); abort();
        }
        at += got;
    }
    close(in);
    close(out);
}

#define REAL(name) static __typeof__(&name) real; \
    if (!real) real = (__typeof__(&name))dlsym(RTLD_NEXT, #name)

ssize_t write(int fd, const void *b, size_t n) {
    REAL(write);
    ssize_t r = real(fd, b, n);
    if (r > 0) note(fd, lseek(fd, 0, SEEK_CUR) - r, r);
    return r;
}
ssize_t writev(int fd, const struct iovec *v, int c) {
    REAL(writev);
    ssize_t r = real(fd, v, c);
    if (r > 0) note(fd, lseek(fd, 0, SEEK_CUR) - r, r);
    return r;
}
ssize_t pwrite(int fd, const void *b, size_t n, off_t off) {
    REAL(pwrite);
    ssize_t r = real(fd, b, n, off);
    note(fd, off, r);
    return r;
}
ssize_t pwrite64(int fd, const void *b, size_t n, off_t off) {
    REAL(pwrite64);
    ssize_t r = real(fd, b, n, off);
    note(fd, off, r);
    return r;
}
ssize_t pwritev(int fd, const struct iovec *v, int c, off_t off) {
    REAL(pwritev);
    ssize_t r = real(fd, v, c, off);
    note(fd, off, r);
    return r;
}
ssize_t pwritev64(int fd, const struct iovec *v, int c, off_t off) {
    REAL(pwritev64);
    ssize_t r = real(fd, v, c, off);
    note(fd, off, r);
    return r;
}
/* After a sync of a directory: its entries as they are now are durable,
   kept as lines of "inode name" in dir-DEV-INODE, replaced whole. */
static void keep_entries(int fd) {
    const char *dir = getenv("CAIRN_DURABLE_DIR");
    struct stat st;
    if (!dir || fstat(fd, &st) != 0 || !S_ISDIR(st.st_mode)) return;
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
    int in = (int)syscall(SYS_openat, AT_FDCWD, self, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (in < 0) { perror("power-loss shim: reopen a synced directory"); abort(); }
    DIR *d = fdopendir(in);
    if (!d) { perror("power-loss shim: list a synced directory"); abort(); }
    char path[PATH_MAX], part[PATH_MAX];
    snprintf(path, sizeof path, "%s/dir-%lu-%lu", dir, (unsigned long)st.st_dev, (unsigned long)st.st_ino);
    snprintf(part, sizeof part, "%s.%ld", path, (long)syscall(SYS_gettid));
    int out = (int)syscall(SYS_openat, AT_FDCWD, part, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (out < 0) { perror("power-loss shim: open a directory's durable entries"); abort(); }
    static __thread char line[PATH_MAX + 32];
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        int n = snprintf(line, sizeof line, "%lu %s\n", (unsigned long)e->d_ino, e->d_name);
        if (syscall(SYS_write, out, line, (size_t)n) != n) {
            perror("power-loss shim: write a directory's durable entries"); abort();
        }
    }
    closedir(d);
    close(out);
    if (syscall(SYS_renameat, AT_FDCWD, part, AT_FDCWD, path) != 0) {
        perror("power-loss shim: replace a directory's durable entries"); abort();
    }
}

int fsync(int fd) {
    REAL(fsync);
    int r = real(fd);
    if (r == 0) { keep(fd); keep_entries(fd); }
    return r;
}
int fdatasync(int fd) {
    REAL(fdatasync);
    int r = real(fd);
    if (r == 0) { keep(fd); keep_entries(fd); }
    return r;
}
"#;

/// Builds the shim in `dir`; None without a C compiler.
pub fn build_shim(dir: &Path) -> Option<PathBuf> {
    let source = dir.join("power_loss.c");
    let library = dir.join("libpower_loss.so");
    std::fs::write(&source, SHIM).ok()?;
    let built = Command::new("cc")
        .args(["-O2", "-shared", "-fPIC", "-o"])
        .arg(&library)
        .arg(&source)
        .arg("-ldl")
        .arg("-lpthread")
        .status()
        .is_ok_and(|s| s.success());
    built.then_some(library)
}

/// The environment that preloads the shim, keeping durable copies in
/// `durable`.
pub fn env(shim: &Path, durable: &Path) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), shim.display().to_string()),
        ("CAIRN_DURABLE_DIR".into(), durable.display().to_string()),
    ]
}

/// The durable copy of `file`, by its device and inode.
fn copy_of(durable: &Path, file: &Path) -> PathBuf {
    let meta = std::fs::metadata(file).expect("stat a data file");
    durable.join(format!("{}-{}", meta.dev(), meta.ino()))
}

/// Every regular file under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d)
            .expect("list a data directory")
            .flatten()
        {
            let kind = entry.file_type().expect("a file type");
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file() {
                found.push(entry.path());
            }
        }
    }
    found
}

/// Every directory under `dir`, `dir` first, parents before children.
fn dirs(dir: &Path) -> Vec<PathBuf> {
    let mut found = vec![dir.to_path_buf()];
    let mut at = 0;
    while let Some(d) = found.get(at).cloned() {
        for entry in std::fs::read_dir(&d)
            .expect("list a data directory")
            .flatten()
        {
            if entry.file_type().expect("a file type").is_dir() {
                found.push(entry.path());
            }
        }
        at += 1;
    }
    found
}

/// The entries of `dir` as they are: name to (inode, is a directory).
fn entries(dir: &Path) -> BTreeMap<String, (u64, bool)> {
    std::fs::read_dir(dir)
        .expect("list a data directory")
        .flatten()
        .map(|e| {
            let meta = e.metadata().expect("stat a directory entry");
            (
                e.file_name().to_string_lossy().into_owned(),
                (meta.ino(), meta.is_dir()),
            )
        })
        .collect()
}

/// Where the shim keeps `dir`'s durable entries, by its device and inode.
fn entries_file(durable: &Path, dir: &Path) -> PathBuf {
    let meta = std::fs::metadata(dir).expect("stat a data directory");
    durable.join(format!("dir-{}-{}", meta.dev(), meta.ino()))
}

/// The entries of `dir` its last sync made durable: name to inode; none
/// if it was never synced.
fn durable_entries(durable: &Path, dir: &Path) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(entries_file(durable, dir)).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (ino, name) = l.split_once(' ')?;
            Some((name.to_string(), ino.parse().ok()?))
        })
        .collect()
}

/// Takes `dir`'s entries as they are as durable, as a sync of it would.
fn keep_entries(durable: &Path, dir: &Path) {
    let text: String = entries(dir)
        .iter()
        .map(|(name, (ino, _))| format!("{ino} {name}\n"))
        .collect();
    std::fs::write(entries_file(durable, dir), text).expect("keep a directory's entries");
}

/// Removes `path` (a file, or a directory with all it holds) and the
/// durable copies of its files, whose inodes a new file may reuse.
fn remove_entry(durable: &Path, path: &Path) {
    if path.is_dir() {
        for file in files(path) {
            let _ = std::fs::remove_file(copy_of(durable, &file));
        }
        std::fs::remove_dir_all(path).expect("remove a lost directory");
    } else {
        let _ = std::fs::remove_file(copy_of(durable, path));
        std::fs::remove_file(path).expect("remove a lost file");
    }
}

/// Takes everything in `data` as durable: its state after a clean stop, or
/// a kill -9 without a power loss (the page cache reaches the disk).
pub fn all_durable(data: &Path, durable: &Path) {
    for file in files(data) {
        std::fs::copy(&file, copy_of(durable, &file)).expect("copy a data file");
    }
    for dir in dirs(data) {
        keep_entries(durable, &dir);
    }
}

/// The first part of what a power loss does to `data`: each directory
/// entry made since its directory's last sync is kept, or lost (`below(2)`
/// says which). Returns, per part of the data directory and outcome, how
/// many entries: "entry kept" or "entry lost" (a new name gone), "entry
/// renamed back" (a rename undone), "entry restored" (a file a lost
/// rename had replaced back from its durable copy).
fn lose_entries(
    data: &Path,
    durable: &Path,
    below: &mut impl FnMut(usize) -> usize,
) -> BTreeMap<(String, &'static str), usize> {
    let mut outcomes = BTreeMap::new();
    let mut todo = vec![data.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let synced = durable_entries(durable, &dir);
        let old_names: BTreeMap<u64, &String> = synced.iter().map(|(n, i)| (*i, n)).collect();
        let now = entries(&dir);
        for (name, &(ino, is_dir)) in &now {
            let path = dir.join(name);
            if synced.get(name) == Some(&ino) {
                if is_dir {
                    todo.push(path);
                }
                continue;
            }
            let part = |p: &Path| -> String {
                let rel: PathBuf = p
                    .strip_prefix(data)
                    .expect("a path of the data directory")
                    .iter()
                    .take(2)
                    .collect();
                rel.display().to_string()
            };
            let outcome = if below(2) == 0 {
                if is_dir {
                    todo.push(path.clone());
                }
                "entry kept"
            } else {
                match old_names.get(&ino) {
                    // Renamed since: back to the old name, if that is free.
                    Some(old) if !now.contains_key(*old) && !dir.join(old).exists() => {
                        let back = dir.join(old);
                        std::fs::rename(&path, &back).expect("undo a rename");
                        if is_dir {
                            todo.push(back);
                        }
                        "entry renamed back"
                    }
                    _ => {
                        remove_entry(durable, &path);
                        "entry lost"
                    }
                }
            };
            *outcomes.entry((part(&path), outcome)).or_insert(0) += 1;
            // The file the name held at the sync, replaced since, is back
            // (unless it lives on under another name).
            if outcome != "entry kept"
                && let Some(&before) = synced.get(name)
                && !path.exists()
                && !now.values().any(|&(i, _)| i == before)
            {
                let copy = durable.join(format!(
                    "{}-{before}",
                    std::fs::metadata(&dir)
                        .expect("stat a data directory")
                        .dev()
                ));
                if let Ok(bytes) = std::fs::read(&copy) {
                    std::fs::write(&path, &bytes).expect("bring back a replaced file");
                    // A new inode: its copy under the new one.
                    std::fs::write(copy_of(durable, &path), &bytes).expect("keep it as durable");
                    *outcomes.entry((part(&path), "entry restored")).or_insert(0) += 1;
                }
            }
        }
    }
    for dir in dirs(data) {
        keep_entries(durable, &dir);
    }
    outcomes
}

const SECTOR: usize = 512;

/// What a power loss leaves in `data` (whose member was killed): each file
/// as last synced, plus the first `k` of the sectors changed since, `k`
/// drawn by `below(n)` (uniform in 0..n) among 0..=changed; a file never
/// synced has no sectors to start from. What is left is durable from then
/// on. Directory entries made since their directory's last sync go first
/// (see `lose_entries`). Returns, per part of the data directory (its
/// first two levels, as `member/kv`) and outcome, how many entries (see
/// `lose_entries`) and files: "unchanged" since synced, "as synced" (every
/// change lost), "torn" (some changed sectors kept), "as written", "gone"
/// (a never-synced file that kept nothing).
pub fn lose_power(
    data: &Path,
    durable: &Path,
    below: &mut impl FnMut(usize) -> usize,
) -> BTreeMap<(String, &'static str), usize> {
    let mut outcomes = lose_entries(data, durable, below);
    for file in files(data) {
        let copy = copy_of(durable, &file);
        let now = std::fs::read(&file).expect("read a data file");
        let synced = std::fs::read(&copy).ok();
        let before = synced.clone().unwrap_or_default();
        let changed: Vec<usize> = (0..now.len().max(before.len()))
            .step_by(SECTOR)
            .filter(|&at| {
                let end = |b: &[u8]| b.get(at..(at + SECTOR).min(b.len())).map(<[u8]>::to_vec);
                end(&now) != end(&before)
            })
            .collect();
        let kept = below(changed.len() + 1);
        let mut left = before.clone();
        for &at in &changed[..kept] {
            let end = (at + SECTOR).min(now.len());
            if left.len() < end {
                left.resize(end, 0);
            }
            if at < end {
                left[at..end].copy_from_slice(&now[at..end]);
            }
        }
        if kept == changed.len() {
            left = now.clone();
        }
        let outcome = match (synced.is_some(), kept) {
            _ if changed.is_empty() => "unchanged",
            (_, k) if k == changed.len() => "as written",
            (false, 0) => "gone",
            (true, 0) => "as synced",
            _ => "torn",
        };
        let part: PathBuf = file
            .strip_prefix(data)
            .expect("a file of the data directory")
            .iter()
            .take(2)
            .collect();
        *outcomes
            .entry((part.display().to_string(), outcome))
            .or_insert(0) += 1;
        if outcome == "gone" {
            std::fs::remove_file(&file).expect("remove a file never synced");
            let _ = std::fs::remove_file(&copy);
            continue;
        }
        std::fs::write(&file, &left).expect("write back what was left");
        std::fs::write(&copy, &left).expect("keep it as durable");
    }
    outcomes
}

/// The raft log's commit index and the store's applied index at the last
/// start, from raft's "newRaft" line.
pub fn commit_and_applied(log: &str) -> Option<(u64, u64)> {
    let line = log.lines().rev().find(|l| l.contains("newRaft"))?;
    let field = |name: &str| -> Option<u64> {
        let rest = &line[line.find(name)? + name.len()..];
        let digits: String = rest
            .trim_start_matches([':', ' ', '='])
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    Some((field("commit")?, field("applied")?))
}
