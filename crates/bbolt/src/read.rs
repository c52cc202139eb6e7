//! Reading a bbolt database: the meta pages, then buckets page by page.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use crate::{
    BRANCH_ELEMENT_SIZE, BRANCH_PAGE, BUCKET_HEADER_SIZE, BUCKET_LEAF, Error, LEAF_ELEMENT_SIZE,
    LEAF_PAGE, MAGIC, META_CHECKED_SIZE, META_PAGE, PAGE_HEADER_SIZE, PAGE_SIZE, VERSION, fnv64a,
    u16_at, u32_at, u64_at,
};

/// B+trees deeper than this are taken for a cycle of corrupt page links.
const MAX_DEPTH: usize = 64;

/// An open bbolt database, read page by page as its buckets are walked
/// (nothing is read ahead or cached, so a big one costs little memory).
/// Bytes after the last page (e.g. the sha256 etcd appends to a snapshot)
/// are never read.
pub struct Db {
    file: File,
    page_size: usize,
    root: Bucket,
    high_water: u64,
    txid: u64,
}

/// A bucket: where its B+tree starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub(crate) root: u64,
    sequence: u64,
    /// The leaf page of an inline bucket (root 0), header included.
    inline: Option<Vec<u8>>,
}

impl Bucket {
    /// The bucket's sequence number (bbolt's `NextSequence`).
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    fn decode(value: &[u8]) -> Result<Bucket, Error> {
        if value.len() < BUCKET_HEADER_SIZE {
            return Err(Error::Corrupt(format!(
                "bucket header of {} bytes",
                value.len()
            )));
        }
        let root = u64_at(value, 0);
        let inline = if root == 0 {
            Some(value[BUCKET_HEADER_SIZE..].to_vec())
        } else {
            None
        };
        Ok(Bucket {
            root,
            sequence: u64_at(value, 8),
            inline,
        })
    }
}

/// One element of a bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Value(Vec<u8>),
    Bucket(Bucket),
}

struct Meta {
    page_size: usize,
    root: u64,
    root_sequence: u64,
    high_water: u64,
    txid: u64,
}

fn decode_meta(page: &[u8]) -> Result<Meta, String> {
    if page.len() < PAGE_HEADER_SIZE + META_CHECKED_SIZE + 8 {
        return Err("file too short for a meta page".into());
    }
    if u16_at(page, 8) & META_PAGE == 0 {
        return Err("meta page has no meta flag".into());
    }
    let meta = &page[PAGE_HEADER_SIZE..];
    if u32_at(meta, 0) != MAGIC {
        return Err("invalid magic".into());
    }
    if u32_at(meta, 4) != VERSION {
        return Err(format!("unsupported format version {}", u32_at(meta, 4)));
    }
    if fnv64a(&meta[..META_CHECKED_SIZE]) != u64_at(meta, META_CHECKED_SIZE) {
        return Err("meta checksum mismatch".into());
    }
    let page_size = u32_at(meta, 8) as usize;
    if !(512..=1 << 20).contains(&page_size) || !page_size.is_power_of_two() {
        return Err(format!("page size {page_size}"));
    }
    Ok(Meta {
        page_size,
        root: u64_at(meta, 16),
        root_sequence: u64_at(meta, 24),
        high_water: u64_at(meta, 40),
        txid: u64_at(meta, 48),
    })
}

impl Db {
    /// Opens the database at `path` for reading, from its newest valid meta.
    pub fn open(path: &Path) -> Result<Db, Error> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        let mut first = vec![0; PAGE_SIZE.min(len as usize)];
        file.read_exact_at(&mut first, 0)?;
        let meta0 = decode_meta(&first);
        // The second meta page sits one page in: of the size the first
        // says, or of the usual size when the first is damaged.
        let second_at = meta0.as_ref().map_or(PAGE_SIZE, |m| m.page_size) as u64;
        let meta1 = if len >= second_at + PAGE_SIZE as u64 {
            let mut second = vec![0; PAGE_SIZE];
            file.read_exact_at(&mut second, second_at)?;
            decode_meta(&second)
        } else {
            Err("file too short for the second meta page".into())
        };
        let meta = match (meta0, meta1) {
            (Ok(a), Ok(b)) => {
                if b.txid > a.txid {
                    b
                } else {
                    a
                }
            }
            (Ok(m), Err(_)) | (Err(_), Ok(m)) => m,
            (Err(a), Err(_)) => return Err(Error::Invalid(a)),
        };
        if meta.high_water.saturating_mul(meta.page_size as u64) > len {
            return Err(Error::Corrupt(format!(
                "{} pages of {} bytes do not fit in {len} bytes",
                meta.high_water, meta.page_size
            )));
        }
        Ok(Db {
            file,
            page_size: meta.page_size,
            root: Bucket {
                root: meta.root,
                sequence: meta.root_sequence,
                inline: None,
            },
            high_water: meta.high_water,
            txid: meta.txid,
        })
    }

    /// The root bucket, whose elements are the top-level buckets.
    pub fn root(&self) -> &Bucket {
        &self.root
    }

    /// The transaction ID of the meta in use.
    pub fn txid(&self) -> u64 {
        self.txid
    }

    /// Pages in use (the high-water mark) times the page size: the size of
    /// the database without any slack at the end of the file.
    pub fn size(&self) -> u64 {
        self.high_water * self.page_size as u64
    }

    /// The elements of `bucket`, in key order.
    pub fn entries(&self, bucket: &Bucket) -> Entries<'_> {
        let first = match &bucket.inline {
            Some(page) => Page::parse(page.clone(), None),
            None => self.page(bucket.root),
        };
        let (stack, pending_error) = match first {
            Ok(page) => (vec![(page, 0)], None),
            Err(e) => (Vec::new(), Some(e)),
        };
        Entries {
            db: self,
            stack,
            pending_error,
        }
    }

    /// The nested bucket `name` of `parent`, if there is one.
    pub fn bucket(&self, parent: &Bucket, name: &[u8]) -> Result<Option<Bucket>, Error> {
        for entry in self.entries(parent) {
            let (key, item) = entry?;
            match key.as_slice().cmp(name) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Greater => break,
                std::cmp::Ordering::Equal => {
                    return Ok(match item {
                        Item::Bucket(b) => Some(b),
                        Item::Value(_) => None,
                    });
                }
            }
        }
        Ok(None)
    }

    fn page(&self, id: u64) -> Result<Page, Error> {
        // Pages 0 and 1 are the metas; a tree never links to them.
        if id < 2 || id >= self.high_water {
            return Err(Error::Corrupt(format!(
                "page {id} out of bounds (high water {})",
                self.high_water
            )));
        }
        let at = id * self.page_size as u64;
        let mut buf = vec![0; self.page_size];
        self.file.read_exact_at(&mut buf, at)?;
        let overflow = u64::from(u32_at(&buf, 12));
        if overflow > 0 {
            if id + overflow >= self.high_water {
                return Err(Error::Corrupt(format!(
                    "page {id} overflows past the high water mark"
                )));
            }
            buf.resize(self.page_size * (1 + overflow as usize), 0);
            self.file
                .read_exact_at(&mut buf[self.page_size..], at + self.page_size as u64)?;
        }
        Page::parse(buf, Some(id))
    }
}

/// A branch or leaf page.
struct Page {
    buf: Vec<u8>,
    branch: bool,
    count: usize,
}

impl Page {
    fn parse(buf: Vec<u8>, id: Option<u64>) -> Result<Page, Error> {
        let what = || id.map_or("inline bucket page".to_string(), |id| format!("page {id}"));
        if buf.len() < PAGE_HEADER_SIZE {
            return Err(Error::Corrupt(format!("{} is cut short", what())));
        }
        if let Some(id) = id
            && u64_at(&buf, 0) != id
        {
            return Err(Error::Corrupt(format!(
                "{} says it is page {}",
                what(),
                u64_at(&buf, 0)
            )));
        }
        let flags = u16_at(&buf, 8);
        let branch = match flags {
            BRANCH_PAGE => true,
            LEAF_PAGE => false,
            _ => {
                return Err(Error::Corrupt(format!(
                    "{} is not a branch or leaf page (flags {flags:#x})",
                    what()
                )));
            }
        };
        let count = usize::from(u16_at(&buf, 10));
        if PAGE_HEADER_SIZE + count * LEAF_ELEMENT_SIZE > buf.len() {
            return Err(Error::Corrupt(format!(
                "{} has more elements than fit",
                what()
            )));
        }
        Ok(Page { buf, branch, count })
    }

    fn slice(&self, at: usize, len: usize) -> Result<&[u8], Error> {
        at.checked_add(len)
            .and_then(|end| self.buf.get(at..end))
            .ok_or_else(|| Error::Corrupt("page element points past its page".into()))
    }

    /// Branch element `i`: its key and child page.
    fn branch(&self, i: usize) -> Result<(Vec<u8>, u64), Error> {
        let at = PAGE_HEADER_SIZE + i * BRANCH_ELEMENT_SIZE;
        let pos = u32_at(&self.buf, at) as usize;
        let ksize = u32_at(&self.buf, at + 4) as usize;
        let child = u64_at(&self.buf, at + 8);
        Ok((self.slice(at + pos, ksize)?.to_vec(), child))
    }

    /// Leaf element `i`: its flags, key and value.
    fn leaf(&self, i: usize) -> Result<(u32, &[u8], &[u8]), Error> {
        let at = PAGE_HEADER_SIZE + i * LEAF_ELEMENT_SIZE;
        let flags = u32_at(&self.buf, at);
        let pos = u32_at(&self.buf, at + 4) as usize;
        let ksize = u32_at(&self.buf, at + 8) as usize;
        let vsize = u32_at(&self.buf, at + 12) as usize;
        let key = self.slice(at + pos, ksize)?;
        let value = self.slice(at + pos + ksize, vsize)?;
        Ok((flags, key, value))
    }
}

/// The elements of a bucket in key order: a depth-first walk of its tree.
pub struct Entries<'a> {
    db: &'a Db,
    /// The pages from the root down to the current one, each with the next
    /// element to visit.
    stack: Vec<(Page, usize)>,
    pending_error: Option<Error>,
}

impl Entries<'_> {
    fn step(&mut self) -> Result<Option<(Vec<u8>, Item)>, Error> {
        loop {
            let Some((page, next)) = self.stack.last_mut() else {
                return Ok(None);
            };
            if *next >= page.count {
                self.stack.pop();
                continue;
            }
            let i = *next;
            *next += 1;
            if page.branch {
                let (_, child) = page.branch(i)?;
                if self.stack.len() >= MAX_DEPTH {
                    return Err(Error::Corrupt(
                        "bucket tree too deep (a page cycle?)".into(),
                    ));
                }
                let child = self.db.page(child)?;
                self.stack.push((child, 0));
                continue;
            }
            let (flags, key, value) = page.leaf(i)?;
            let item = if flags & BUCKET_LEAF != 0 {
                Item::Bucket(Bucket::decode(value)?)
            } else {
                Item::Value(value.to_vec())
            };
            return Ok(Some((key.to_vec(), item)));
        }
    }
}

impl Iterator for Entries<'_> {
    type Item = Result<(Vec<u8>, Item), Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.pending_error.take() {
            return Some(Err(e));
        }
        match self.step() {
            Ok(entry) => entry.map(Ok),
            Err(e) => {
                // Stop after an error rather than walk on over damage.
                self.stack.clear();
                Some(Err(e))
            }
        }
    }
}
