//! bbolt's file format, as etcd's backend database uses it: a reader
//! ([`Db`]) and a writer of fresh, compact databases ([`Writer`]).
//!
//! The format (bbolt v1.3, format version 2, all integers little-endian):
//!
//! - The file is a sequence of pages of one size (4096 here). Every page
//!   starts with a 16-byte header: page ID u64, flags u16 (branch 0x01,
//!   leaf 0x02, meta 0x04, freelist 0x10), element count u16, overflow u32
//!   (how many more pages this one spans, for elements bigger than a page).
//! - Pages 0 and 1 are meta pages: magic 0xED0CDAED, version 2, page size,
//!   flags, the root bucket (root page u64, sequence u64), the freelist page,
//!   the high-water page ID (pages in use), the transaction ID and an FNV-1a
//!   64-bit checksum of the meta's bytes before it. The valid meta with the
//!   higher transaction ID is the database.
//! - A bucket is a B+tree: branch pages hold elements (pos u32, key size u32,
//!   child page u64) whose key is the child's first key; leaf pages hold
//!   elements (flags u32, pos u32, key size u32, value size u32). `pos` is
//!   the distance from the element to its key; the value follows the key.
//! - A leaf element with flag 0x01 is a nested bucket: its value is the
//!   bucket header (root page u64, sequence u64), and when the root is 0
//!   the bucket is inline: a leaf page (header included) follows the header
//!   inside the value.
//! - The freelist page lists free page IDs (u64 each); a count of 0xFFFF
//!   means the real count is the first u64 of the page's data.
//!
//! ```
//! use cairn_bbolt::{Db, Item, Writer};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("db");
//! let mut writer = Writer::new(std::fs::File::create(&path)?)?;
//! writer.begin_bucket(b"key")?;
//! writer.put(b"a", b"1")?;
//! writer.put(b"b", b"2")?;
//! writer.finish()?;
//!
//! let db = Db::open(&path)?;
//! let bucket = db.bucket(db.root(), b"key")?.expect("the bucket was written");
//! let entries: Vec<(Vec<u8>, Item)> = db.entries(&bucket).collect::<Result<_, _>>()?;
//! assert_eq!(entries.len(), 2);
//! assert!(matches!(&entries[1], (k, Item::Value(v)) if k == b"b" && v == b"2"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod read;
mod write;

#[cfg(test)]
mod tests;

pub use read::{Bucket, Db, Entries, Item};
pub use write::Writer;

/// The page size of databases this crate writes (etcd's, on Linux/x86-64).
pub const PAGE_SIZE: usize = 4096;

const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;

const PAGE_HEADER_SIZE: usize = 16;
const BRANCH_ELEMENT_SIZE: usize = 16;
const LEAF_ELEMENT_SIZE: usize = 16;
const BUCKET_HEADER_SIZE: usize = 16;
/// Meta fields before the checksum: magic, version, page size, flags, root
/// bucket (16), freelist, high-water page ID, transaction ID.
const META_CHECKED_SIZE: usize = 56;

const BRANCH_PAGE: u16 = 0x01;
const LEAF_PAGE: u16 = 0x02;
const META_PAGE: u16 = 0x04;
const FREELIST_PAGE: u16 = 0x10;

/// A leaf element flag: the value is a nested bucket.
const BUCKET_LEAF: u32 = 0x01;

/// bbolt inlines a bucket without nested buckets whose leaf takes at most a
/// quarter page.
const MAX_INLINE_BUCKET_SIZE: usize = PAGE_SIZE / 4;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a bbolt database: {0}")]
    Invalid(String),
    #[error("corrupt bbolt database: {0}")]
    Corrupt(String),
    #[error("keys must be written in strictly increasing order")]
    Unordered,
    #[error("{0} is too big for a bbolt page element")]
    TooBig(&'static str),
}

/// FNV-1a, 64 bits: bbolt's meta checksum.
fn fnv64a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}
