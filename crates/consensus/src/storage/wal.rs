//! The raft log's files: append-only segments of checksummed records, as
//! etcd's WAL. A Ready costs one write and, when raft says so, one fdatasync;
//! nothing is rewritten later (an LSM tree wrote each entry three times).
//!
//! A record is `[payload length: u32 LE][crc32 of kind and payload: u32 LE]
//! [kind: u8][payload]`. Later records win: an entry at an index already
//! held replaces it and everything after, the last hard state is the hard
//! state. Each segment after the first opens with a checkpoint of the state
//! records, so that segments whose entries are all compacted away can be
//! deleted from the front.
//!
//! Segments grow by zero-filled chunks written ahead of the records: an
//! fdatasync then writes the records' pages only, with no block
//! allocation or inode update of its own. Zeros after the last record are
//! the unused part of a chunk, not damage.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::prelude::Entry;

use crate::Error;

const SUFFIX: &str = ".wal";
const HEADER: usize = 9;
/// A segment this large is closed and a new one started.
pub(crate) const SEGMENT_BYTES: u64 = 64 << 20;
/// Segments are zero-filled this far ahead of their records.
const CHUNK_BYTES: u64 = 4 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Entry = 1,
    HardState = 2,
    ConfState = 3,
    /// The member registry, JSON.
    Members = 4,
    /// Entries up to this snapshot metadata's index are gone.
    Compacted = 5,
    /// A snapshot was installed: every earlier entry is gone, the log
    /// resumes after this metadata's index.
    Reset = 6,
    /// A record of one raft group in a log that several share: the group
    /// (u64 LE), then the record's own kind byte and payload.
    Group = 7,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Entry,
            2 => Kind::HardState,
            3 => Kind::ConfState,
            4 => Kind::Members,
            5 => Kind::Compacted,
            6 => Kind::Reset,
            7 => Kind::Group,
            _ => return None,
        })
    }
}

pub(crate) enum Record {
    Entry(Entry),
    /// Any other kind, still encoded.
    State(Kind, Vec<u8>),
    /// A record of one group, in a log several groups share.
    Group(u64, Box<Record>),
}

struct Segment {
    seq: u64,
    /// The highest entry index written to it (0 for none).
    max_index: u64,
}

pub(crate) struct Wal {
    dir: PathBuf,
    /// Oldest first; the last is the one being written.
    segments: Vec<Segment>,
    file: File,
    /// Where the next record goes.
    size: u64,
    /// The file's length: zeros from `size` on.
    allocated: u64,
    segment_bytes: u64,
    /// Records pushed since the last commit.
    buf: Vec<u8>,
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}{SUFFIX}"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `fs::create_dir_all`, each directory it makes synced into its parent:
/// until then a power loss may take the directory, and all it holds, away.
pub fn create_dir_durably(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    create_dir_durably(parent)?;
    match fs::create_dir(dir) {
        Ok(()) => {}
        // Made meanwhile by another thread or process; its maker syncs it.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(e),
    }
    sync_dir(parent)
}

impl Wal {
    /// Opens the log in `dir`, creating it when missing, and returns every
    /// record in it, oldest first. A torn record at the end of the last
    /// segment (a write a crash cut short, never acknowledged) is cut off.
    pub(crate) fn open(dir: &Path, segment_bytes: u64) -> Result<(Wal, Vec<Record>), Error> {
        let (wal, records) = Wal::open_segmented(dir, segment_bytes)?;
        Ok((wal, records.into_iter().map(|(_, record)| record).collect()))
    }

    /// [`Wal::open`], each record with the sequence number of its segment.
    pub(crate) fn open_segmented(
        dir: &Path,
        segment_bytes: u64,
    ) -> Result<(Wal, Vec<(u64, Record)>), Error> {
        create_dir_durably(dir)?;
        let mut seqs = Vec::new();
        for item in fs::read_dir(dir)? {
            let name = item?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(hex) = name.strip_suffix(SUFFIX) {
                let seq = u64::from_str_radix(hex, 16)
                    .map_err(|_| Error::Corrupt(format!("unexpected raft log file {name}")))?;
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        let mut records = Vec::new();
        let mut segments = Vec::with_capacity(seqs.len());
        let mut tail = None;
        for (i, &seq) in seqs.iter().enumerate() {
            let path = segment_path(dir, seq);
            let mut bytes = Vec::new();
            File::open(&path)?.read_to_end(&mut bytes)?;
            let mut segment_records = Vec::new();
            let (valid, max_index) = read_records(&bytes, &mut segment_records)?;
            records.extend(segment_records.into_iter().map(|record| (seq, record)));
            let last = i + 1 == seqs.len();
            let clean = bytes[valid..].iter().all(|&b| b == 0);
            // Damage is only forgiven at the end of the last segment, and
            // only where a crash could have left it: a record cut short.
            // Anything else (a flipped bit in a whole record) is bit rot,
            // and the entries after it may have been acknowledged.
            if !clean && (!last || !torn(&bytes, valid)) {
                return Err(Error::Corrupt(format!(
                    "{} is damaged at byte {valid}: a record fails its checksum; \
                     this member's data must be rebuilt from the cluster \
                     (remove it and add it again)",
                    path.display()
                )));
            }
            segments.push(Segment { seq, max_index });
            if last {
                tail = Some((path, valid as u64, bytes.len() as u64, clean));
            }
        }
        let (file, size, allocated) = match tail {
            Some((path, size, len, clean)) => {
                let file = OpenOptions::new().write(true).open(&path)?;
                if clean {
                    (file, size, len)
                } else {
                    // Cut, not overwritten: new records shorter than the
                    // torn bytes must not run into what is left of them.
                    tracing::warn!(path = %path.display(), size, "cut a torn record off the raft log");
                    file.set_len(size)?;
                    file.sync_all()?;
                    (file, size, size)
                }
            }
            None => {
                segments.push(Segment {
                    seq: 0,
                    max_index: 0,
                });
                (create_segment(dir, 0)?, 0, 0)
            }
        };
        let wal = Wal {
            dir: dir.to_owned(),
            segments,
            file,
            size,
            allocated,
            segment_bytes,
            buf: Vec::new(),
        };
        Ok((wal, records))
    }

    pub(crate) fn push_entry(&mut self, entry: &Entry) -> Result<(), Error> {
        let current = self.segments.last_mut().expect("a segment is always open");
        current.max_index = current.max_index.max(entry.index);
        self.push_with(Kind::Entry, |buf| entry.write_to_vec(buf))
    }

    pub(crate) fn push(
        &mut self,
        kind: Kind,
        message: &impl protobuf::Message,
    ) -> Result<(), Error> {
        self.push_with(kind, |buf| message.write_to_vec(buf))
    }

    pub(crate) fn push_bytes(&mut self, kind: Kind, payload: &[u8]) -> Result<(), Error> {
        self.push_with(kind, |buf| {
            buf.extend_from_slice(payload);
            Ok(())
        })
    }

    fn push_with(
        &mut self,
        kind: Kind,
        encode: impl FnOnce(&mut Vec<u8>) -> protobuf::ProtobufResult<()>,
    ) -> Result<(), Error> {
        encode_record(&mut self.buf, kind, encode)
    }

    /// Takes records encoded elsewhere (by [`encode_record`]) for the next
    /// commit; `max_index` is the highest entry index among them.
    pub(crate) fn push_encoded(&mut self, records: &[u8], max_index: u64) {
        let current = self.segments.last_mut().expect("a segment is always open");
        current.max_index = current.max_index.max(max_index);
        self.buf.extend_from_slice(records);
    }

    /// Whether records were pushed and not written yet.
    pub(crate) fn has_unwritten(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The sequence number of the segment being written.
    pub(crate) fn current_segment(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.seq)
    }

    /// Deletes the oldest closed segments, those before `seq`.
    pub(crate) fn remove_segments_before(&mut self, seq: u64) -> Result<(), Error> {
        let closed = self.segments.len() - 1;
        let removable = self.segments[..closed]
            .iter()
            .take_while(|s| s.seq < seq)
            .count();
        for segment in self.segments.drain(..removable) {
            fs::remove_file(segment_path(&self.dir, segment.seq))?;
        }
        if removable > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Another handle on the segment being written, to fdatasync it without
    /// holding whatever guards this log.
    pub(crate) fn sync_handle(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Writes the pushed records, and fdatasyncs them when `sync`. A
    /// failed commit (a full disk) keeps the records and may be called
    /// again: they are written at the segment's end, not at the file's
    /// cursor, which a short write would have moved.
    pub(crate) fn commit(&mut self, sync: bool) -> Result<(), Error> {
        use std::os::unix::fs::FileExt as _;
        if !self.buf.is_empty() {
            let end = self.size + self.buf.len() as u64;
            if end > self.allocated {
                self.zero_fill(end)?;
            }
            self.file.write_all_at(&self.buf, self.size)?;
            self.size += self.buf.len() as u64;
            self.buf.clear();
        }
        if sync {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Extends the segment with zeros to the chunk past `end`, durably, so
    /// the writes up to there overwrite blocks that exist already.
    fn zero_fill(&mut self, end: u64) -> Result<(), Error> {
        use std::os::unix::fs::FileExt as _;
        // Small segments (in tests) grow by small chunks.
        let chunk = CHUNK_BYTES.min(self.segment_bytes);
        let target = end.div_ceil(chunk) * chunk;
        let zeros = vec![0; 1 << 16];
        while self.allocated < target {
            let n = (target - self.allocated).min(zeros.len() as u64);
            self.file
                .write_all_at(&zeros[..n as usize], self.allocated)?;
            self.allocated += n;
        }
        self.file.sync_data()?;
        Ok(())
    }

    /// True once the current segment is full: the caller starts a new one
    /// with [`Self::start_segment`] and writes its checkpoint.
    pub(crate) fn segment_full(&self) -> bool {
        self.size >= self.segment_bytes
    }

    /// Closes the current segment (synced) and opens the next, empty.
    pub(crate) fn start_segment(&mut self) -> Result<(), Error> {
        self.commit(true)?;
        // The closed segment keeps its records only.
        self.file.set_len(self.size)?;
        self.file.sync_all()?;
        let seq = self.segments.last().map_or(0, |s| s.seq + 1);
        self.file = create_segment(&self.dir, seq)?;
        self.size = 0;
        self.allocated = 0;
        self.segments.push(Segment { seq, max_index: 0 });
        Ok(())
    }

    /// Deletes the oldest closed segments while every entry in them is at
    /// or below `index`. With `all`, every closed segment goes. The records
    /// that make them unnecessary must be durable already.
    pub(crate) fn remove_segments(&mut self, index: u64, all: bool) -> Result<(), Error> {
        let closed = self.segments.len() - 1;
        let removable = self.segments[..closed]
            .iter()
            .take_while(|s| all || s.max_index <= index)
            .count();
        for segment in self.segments.drain(..removable) {
            fs::remove_file(segment_path(&self.dir, segment.seq))?;
        }
        if removable > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

/// Whether the bad record at `at` is a write a crash cut short: its claimed
/// length runs past the last byte ever written, or one of its 512-byte
/// sectors is all zeros (sectors reach the disk whole, and the segment was
/// zero-filled ahead: etcd's test for a torn entry).
fn torn(bytes: &[u8], at: usize) -> bool {
    const SECTOR: usize = 512;
    let written = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let claimed = bytes.get(at..at + 4).map_or(0, |len| {
        u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize
    });
    let end = at + HEADER + claimed;
    if end > written {
        return true;
    }
    let mut start = at;
    while start < end {
        let chunk_end = ((start / SECTOR + 1) * SECTOR).min(end);
        if bytes[start..chunk_end].iter().all(|&b| b == 0) {
            return true;
        }
        start = chunk_end;
    }
    false
}

/// Encodes a record at the end of `buf`: header placeholder, payload, then
/// the header filled in.
pub(crate) fn encode_record(
    buf: &mut Vec<u8>,
    kind: Kind,
    encode: impl FnOnce(&mut Vec<u8>) -> protobuf::ProtobufResult<()>,
) -> Result<(), Error> {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER]);
    buf[start + 8] = kind as u8;
    encode(buf)?;
    let len = u32::try_from(buf.len() - start - HEADER)
        .map_err(|_| Error::Corrupt("a raft log record over 4 GiB".into()))?;
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

fn create_segment(dir: &Path, seq: u64) -> Result<File, Error> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(segment_path(dir, seq))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Appends the records of one segment to `records`; returns how many bytes
/// of it are valid, and the highest entry index in it. Reading stops at the
/// first record that is short or fails its checksum.
fn decode_record(kind: Kind, payload: &[u8]) -> Result<Record, Error> {
    Ok(match kind {
        Kind::Entry => Record::Entry(Entry::parse_from_bytes(payload)?),
        Kind::Group => {
            let (group, inner) = payload
                .split_first_chunk::<8>()
                .ok_or_else(|| Error::Corrupt("a group record without its group".into()))?;
            let (&inner_kind, inner_payload) = inner
                .split_first()
                .ok_or_else(|| Error::Corrupt("a group record without its kind".into()))?;
            let inner_kind = Kind::from_byte(inner_kind)
                .filter(|k| *k != Kind::Group)
                .ok_or_else(|| Error::Corrupt(format!("group record of kind {inner_kind}")))?;
            Record::Group(
                u64::from_le_bytes(*group),
                Box::new(decode_record(inner_kind, inner_payload)?),
            )
        }
        other => Record::State(other, payload.to_vec()),
    })
}

fn read_records(bytes: &[u8], records: &mut Vec<Record>) -> Result<(usize, u64), Error> {
    let mut at = 0;
    let mut max_index = 0;
    while bytes.len() - at >= HEADER {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        let end = at + HEADER + len;
        if end > bytes.len() || crc32fast::hash(&bytes[at + 8..end]) != crc {
            break;
        }
        let Some(kind) = Kind::from_byte(bytes[at + 8]) else {
            break;
        };
        let payload = &bytes[at + HEADER..end];
        let record = decode_record(kind, payload)?;
        if let Record::Entry(entry) = &record {
            max_index = max_index.max(entry.index);
        }
        records.push(record);
        at = end;
    }
    Ok((at, max_index))
}
