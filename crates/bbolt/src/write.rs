//! Writing a fresh, compact bbolt database from sorted bucket contents.
//!
//! Pages are written in page-ID order as buckets fill them: leaves as their
//! keys arrive, a bucket's branch pages when it ends, the root bucket and
//! the metas last. Every page is in use (the freelist is empty), leaves are
//! packed full, and small buckets without nested ones are inlined as bbolt
//! inlines them, so bbolt's consistency check passes and bbolt (etcd) can
//! open the database and go on writing to it.

use std::io::{Seek, SeekFrom, Write};

use crate::{
    BRANCH_ELEMENT_SIZE, BRANCH_PAGE, BUCKET_HEADER_SIZE, BUCKET_LEAF, Error, FREELIST_PAGE,
    LEAF_ELEMENT_SIZE, LEAF_PAGE, MAGIC, MAX_INLINE_BUCKET_SIZE, META_CHECKED_SIZE, META_PAGE,
    PAGE_HEADER_SIZE, PAGE_SIZE, VERSION, fnv64a,
};

/// bbolt's largest key.
const MAX_KEY_SIZE: usize = 32768;
/// bbolt's largest value.
const MAX_VALUE_SIZE: usize = (1 << 31) - 2;
const FREELIST_PAGE_ID: u64 = 2;
/// The metas' transaction IDs: bbolt writes transaction N's meta to page
/// N % 2, and opens from the valid one with the higher ID.
const META_TXIDS: [u64; 2] = [2, 3];

/// The value a finished bucket is stored under in its parent: the bucket
/// header, followed by the bucket's leaf page when it is inline; and the
/// bucket's root page (0 when inline).
struct BucketValue {
    value: Vec<u8>,
    root: u64,
}

/// Writes a database to `out`, one bucket at a time; see the module docs.
///
/// Buckets nest: [`begin_bucket`](Writer::begin_bucket) opens one inside the
/// open bucket (at first the root bucket, whose elements are the top-level
/// buckets), [`put`](Writer::put) adds to the innermost open bucket, and
/// [`end_bucket`](Writer::end_bucket) closes it. Within each bucket, keys
/// (values' and nested buckets' alike) come in strictly increasing order.
pub struct Writer<W: Write + Seek> {
    pages: Pages<W>,
    root: BucketWriter,
    /// Open buckets below the root, outermost first, with their names.
    open: Vec<(Vec<u8>, BucketWriter)>,
}

/// The output, written one page after another.
struct Pages<W: Write + Seek> {
    out: W,
    next: u64,
}

impl<W: Write + Seek> Writer<W> {
    /// Starts a database at the beginning of `out`.
    pub fn new(mut out: W) -> Result<Writer<W>, Error> {
        out.seek(SeekFrom::Start(0))?;
        // The metas come last, once the root is known.
        out.write_all(&[0; 2 * PAGE_SIZE])?;
        let mut pages = Pages {
            out,
            next: FREELIST_PAGE_ID,
        };
        // An empty freelist: every page of a fresh database is in use.
        pages.write(FREELIST_PAGE, 0, &[])?;
        Ok(Writer {
            pages,
            root: BucketWriter::new(),
            open: Vec::new(),
        })
    }

    /// Opens bucket `name` inside the open bucket.
    pub fn begin_bucket(&mut self, name: &[u8]) -> Result<(), Error> {
        self.innermost().check_key(name)?;
        self.open.push((name.to_vec(), BucketWriter::new()));
        Ok(())
    }

    /// Adds `key` → `value` to the innermost open bucket.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        if value.len() > MAX_VALUE_SIZE {
            return Err(Error::TooBig("value"));
        }
        let bucket = match self.open.last_mut() {
            Some((_, bucket)) => bucket,
            None => &mut self.root,
        };
        bucket.add(&mut self.pages, key, value, 0)
    }

    /// Closes the innermost open bucket (not the root).
    pub fn end_bucket(&mut self) -> Result<(), Error> {
        let Some((name, bucket)) = self.open.pop() else {
            return Err(Error::Invalid("no bucket is open".into()));
        };
        let finished = bucket.finish(&mut self.pages, false)?;
        let parent = match self.open.last_mut() {
            Some((_, parent)) => parent,
            None => &mut self.root,
        };
        parent.add(&mut self.pages, &name, &finished.value, BUCKET_LEAF)
    }

    /// Closes any buckets still open, writes the root bucket and the metas,
    /// flushes, and returns `out`, positioned at the end of the database.
    pub fn finish(mut self) -> Result<W, Error> {
        while !self.open.is_empty() {
            self.end_bucket()?;
        }
        let root = self.root.finish(&mut self.pages, true)?;
        let Pages { mut out, next } = self.pages;
        for (id, txid) in META_TXIDS.into_iter().enumerate() {
            out.seek(SeekFrom::Start(id as u64 * PAGE_SIZE as u64))?;
            out.write_all(&meta_page(id as u64, root.root, next, txid))?;
        }
        out.seek(SeekFrom::Start(next * PAGE_SIZE as u64))?;
        out.flush()?;
        Ok(out)
    }

    fn innermost(&self) -> &BucketWriter {
        self.open.last().map_or(&self.root, |(_, bucket)| bucket)
    }
}

impl<W: Write + Seek> Pages<W> {
    /// Writes one page (with overflow pages if `body` needs them) at the
    /// next page ID, and returns that ID.
    fn write(&mut self, flags: u16, count: usize, body: &[u8]) -> Result<u64, Error> {
        let pages = (PAGE_HEADER_SIZE + body.len()).div_ceil(PAGE_SIZE).max(1);
        let id = self.next;
        let count = u16::try_from(count).map_err(|_| Error::TooBig("page element count"))?;
        let overflow = u32::try_from(pages - 1).map_err(|_| Error::TooBig("page"))?;
        let mut page = Vec::with_capacity(pages * PAGE_SIZE);
        page.extend_from_slice(&page_header(id, flags, count, overflow));
        page.extend_from_slice(body);
        page.resize(pages * PAGE_SIZE, 0);
        self.out.write_all(&page)?;
        self.next += pages as u64;
        Ok(id)
    }
}

/// One open bucket: its leaf being filled and the leaves already written.
struct BucketWriter {
    /// The current leaf's elements: flags, key, value.
    pending: Vec<(u32, Vec<u8>, Vec<u8>)>,
    /// Their size on the page, element headers included.
    pending_size: usize,
    /// The first key and page of each leaf written.
    leaves: Vec<(Vec<u8>, u64)>,
    last_key: Option<Vec<u8>>,
    has_buckets: bool,
}

impl BucketWriter {
    fn new() -> BucketWriter {
        BucketWriter {
            pending: Vec::new(),
            pending_size: 0,
            leaves: Vec::new(),
            last_key: None,
            has_buckets: false,
        }
    }

    fn check_key(&self, key: &[u8]) -> Result<(), Error> {
        if key.is_empty() {
            return Err(Error::Invalid("a key may not be empty".into()));
        }
        if key.len() > MAX_KEY_SIZE {
            return Err(Error::TooBig("key"));
        }
        if self.last_key.as_deref().is_some_and(|last| last >= key) {
            return Err(Error::Unordered);
        }
        Ok(())
    }

    fn add<W: Write + Seek>(
        &mut self,
        pages: &mut Pages<W>,
        key: &[u8],
        value: &[u8],
        flags: u32,
    ) -> Result<(), Error> {
        self.check_key(key)?;
        let element = LEAF_ELEMENT_SIZE + key.len() + value.len();
        if !self.pending.is_empty() && PAGE_HEADER_SIZE + self.pending_size + element > PAGE_SIZE {
            self.flush_leaf(pages)?;
        }
        self.last_key = Some(key.to_vec());
        self.pending_size += element;
        self.has_buckets |= flags & BUCKET_LEAF != 0;
        self.pending.push((flags, key.to_vec(), value.to_vec()));
        Ok(())
    }

    fn flush_leaf<W: Write + Seek>(&mut self, pages: &mut Pages<W>) -> Result<(), Error> {
        let first = self
            .pending
            .first()
            .map(|(_, k, _)| k.clone())
            .unwrap_or_default();
        let body = leaf_body(&self.pending)?;
        let id = pages.write(LEAF_PAGE, self.pending.len(), &body)?;
        self.leaves.push((first, id));
        self.pending.clear();
        self.pending_size = 0;
        Ok(())
    }

    /// Writes what is left of the bucket and its branch pages; `paged`
    /// forbids inlining (the root bucket).
    fn finish<W: Write + Seek>(
        mut self,
        pages: &mut Pages<W>,
        paged: bool,
    ) -> Result<BucketValue, Error> {
        let mut value = Vec::with_capacity(BUCKET_HEADER_SIZE);
        if !paged
            && self.leaves.is_empty()
            && !self.has_buckets
            && PAGE_HEADER_SIZE + self.pending_size <= MAX_INLINE_BUCKET_SIZE
        {
            value.extend_from_slice(&0u64.to_le_bytes());
            value.extend_from_slice(&0u64.to_le_bytes());
            let count = u16::try_from(self.pending.len())
                .map_err(|_| Error::TooBig("page element count"))?;
            value.extend_from_slice(&page_header(0, LEAF_PAGE, count, 0));
            value.extend_from_slice(&leaf_body(&self.pending)?);
            return Ok(BucketValue { value, root: 0 });
        }
        // An empty bucket that may not be inline still has its (empty) leaf.
        if !self.pending.is_empty() || self.leaves.is_empty() {
            self.flush_leaf(pages)?;
        }
        let mut level = self.leaves;
        while level.len() > 1 {
            level = write_branches(pages, &level)?;
        }
        let root = level.first().map_or(0, |(_, id)| *id);
        value.extend_from_slice(&root.to_le_bytes());
        value.extend_from_slice(&0u64.to_le_bytes());
        Ok(BucketValue { value, root })
    }
}

/// Writes branch pages over `children` (first key, page), packed full, and
/// returns the level above: each branch page's first key and ID.
fn write_branches<W: Write + Seek>(
    pages: &mut Pages<W>,
    children: &[(Vec<u8>, u64)],
) -> Result<Vec<(Vec<u8>, u64)>, Error> {
    let mut parents = Vec::new();
    let mut start = 0;
    while start < children.len() {
        let mut end = start;
        let mut size = PAGE_HEADER_SIZE;
        while end < children.len() {
            let element = BRANCH_ELEMENT_SIZE + children[end].0.len();
            if end > start && size + element > PAGE_SIZE {
                break;
            }
            size += element;
            end += 1;
        }
        let group = &children[start..end];
        let id = pages.write(BRANCH_PAGE, group.len(), &branch_body(group)?)?;
        parents.push((group[0].0.clone(), id));
        start = end;
    }
    Ok(parents)
}

fn page_header(id: u64, flags: u16, count: u16, overflow: u32) -> [u8; PAGE_HEADER_SIZE] {
    let mut header = [0; PAGE_HEADER_SIZE];
    header[..8].copy_from_slice(&id.to_le_bytes());
    header[8..10].copy_from_slice(&flags.to_le_bytes());
    header[10..12].copy_from_slice(&count.to_le_bytes());
    header[12..16].copy_from_slice(&overflow.to_le_bytes());
    header
}

fn to_u32(n: usize, what: &'static str) -> Result<u32, Error> {
    u32::try_from(n).map_err(|_| Error::TooBig(what))
}

/// A leaf page after its header: the elements, then each key and value.
fn leaf_body(elements: &[(u32, Vec<u8>, Vec<u8>)]) -> Result<Vec<u8>, Error> {
    let headers = elements.len() * LEAF_ELEMENT_SIZE;
    let mut out = Vec::with_capacity(headers);
    let mut data = Vec::new();
    for (i, (flags, key, value)) in elements.iter().enumerate() {
        // Distance from this element to its key.
        let pos = headers - i * LEAF_ELEMENT_SIZE + data.len();
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&to_u32(pos, "page")?.to_le_bytes());
        out.extend_from_slice(&to_u32(key.len(), "key")?.to_le_bytes());
        out.extend_from_slice(&to_u32(value.len(), "value")?.to_le_bytes());
        data.extend_from_slice(key);
        data.extend_from_slice(value);
    }
    out.extend_from_slice(&data);
    Ok(out)
}

/// A branch page after its header: the elements, then each key.
fn branch_body(children: &[(Vec<u8>, u64)]) -> Result<Vec<u8>, Error> {
    let headers = children.len() * BRANCH_ELEMENT_SIZE;
    let mut out = Vec::with_capacity(headers);
    let mut data = Vec::new();
    for (i, (key, child)) in children.iter().enumerate() {
        let pos = headers - i * BRANCH_ELEMENT_SIZE + data.len();
        out.extend_from_slice(&to_u32(pos, "page")?.to_le_bytes());
        out.extend_from_slice(&to_u32(key.len(), "key")?.to_le_bytes());
        out.extend_from_slice(&child.to_le_bytes());
        data.extend_from_slice(key);
    }
    out.extend_from_slice(&data);
    Ok(out)
}

fn meta_page(id: u64, root: u64, high_water: u64, txid: u64) -> Vec<u8> {
    let mut page = vec![0; PAGE_SIZE];
    page[..PAGE_HEADER_SIZE].copy_from_slice(&page_header(id, META_PAGE, 0, 0));
    let mut meta = Vec::with_capacity(META_CHECKED_SIZE + 8);
    meta.extend_from_slice(&MAGIC.to_le_bytes());
    meta.extend_from_slice(&VERSION.to_le_bytes());
    meta.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    meta.extend_from_slice(&0u32.to_le_bytes());
    meta.extend_from_slice(&root.to_le_bytes());
    meta.extend_from_slice(&0u64.to_le_bytes());
    meta.extend_from_slice(&FREELIST_PAGE_ID.to_le_bytes());
    meta.extend_from_slice(&high_water.to_le_bytes());
    meta.extend_from_slice(&txid.to_le_bytes());
    let checksum = fnv64a(&meta);
    meta.extend_from_slice(&checksum.to_le_bytes());
    page[PAGE_HEADER_SIZE..PAGE_HEADER_SIZE + meta.len()].copy_from_slice(&meta);
    page
}
