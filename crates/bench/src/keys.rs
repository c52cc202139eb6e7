//! Keys and values as etcd's benchmark makes them, and values that carry
//! the moment they were sent (to time watch delivery).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;

/// Key number `n` as etcd's benchmark writes it: `n` as a zig-zag varint
/// (Go's `binary.PutVarint`) at the start of `size` zero bytes.
pub fn bench_key(n: u64, size: usize) -> Bytes {
    let mut key = vec![0u8; size];
    let mut v = zigzag(n);
    let mut i = 0;
    while v >= 0x80 {
        key[i] = (v as u8) | 0x80;
        v >>= 7;
        i += 1;
    }
    key[i] = v as u8;
    Bytes::from(key)
}

fn zigzag(n: u64) -> u64 {
    // A non-negative int64 n encodes as 2n.
    n << 1
}

/// Bytes needed by the varint of key number `n`.
fn varint_len(n: u64) -> usize {
    let bits = 64 - zigzag(n).leading_zeros() as usize;
    bits.div_ceil(7).max(1)
}

/// Picks the key of each request within a key space of `space` keys.
#[derive(Clone, Debug)]
pub struct KeyPicker {
    space: u64,
    size: usize,
    sequential: bool,
}

impl KeyPicker {
    pub fn new(space: u64, size: usize, sequential: bool) -> Result<KeyPicker> {
        if space == 0 {
            bail!("--key-space-size must be at least 1");
        }
        if varint_len(space - 1) > size {
            bail!("--key-size {size} is too small for a key space of {space} keys");
        }
        Ok(KeyPicker {
            space,
            size,
            sequential,
        })
    }

    /// The key number of request `n`: `n` modulo the space if sequential,
    /// else uniformly random.
    pub fn number(&self, n: u64) -> u64 {
        if self.sequential {
            n % self.space
        } else {
            fastrand::u64(..self.space)
        }
    }

    pub fn key(&self, n: u64) -> Bytes {
        bench_key(self.number(n), self.size)
    }

    /// `count` distinct keys starting at request `n`'s (a txn may not put
    /// the same key twice).
    pub fn distinct_keys(&self, n: u64, count: u64) -> Vec<Bytes> {
        let first = self.number(n);
        (0..count)
            .map(|j| bench_key((first + j) % self.space, self.size))
            .collect()
    }

    pub fn space(&self) -> u64 {
        self.space
    }
}

/// `size` random bytes (etcd's benchmark values are random, once per run).
pub fn random_value(size: usize) -> Bytes {
    let mut v = vec![0u8; size];
    fastrand::fill(&mut v);
    Bytes::from(v)
}

/// Smallest value that can carry a send time.
pub const STAMP_LEN: usize = 8;

/// A value of `size` bytes (at least [`STAMP_LEN`]) whose first bytes are
/// the time since `epoch`, so whoever receives it knows how old it is.
pub fn stamped_value(epoch: Instant, size: usize) -> Bytes {
    let nanos = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let mut v = vec![b'.'; size.max(STAMP_LEN)];
    v[..STAMP_LEN].copy_from_slice(&nanos.to_be_bytes());
    Bytes::from(v)
}

/// How long ago a [`stamped_value`] was made; None if it carries no stamp.
pub fn stamp_age(epoch: Instant, value: &[u8]) -> Option<Duration> {
    let stamp: [u8; STAMP_LEN] = value.get(..STAMP_LEN)?.try_into().ok()?;
    let sent = Duration::from_nanos(u64::from_be_bytes(stamp));
    Some(epoch.elapsed().saturating_sub(sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_gos_putvarint() {
        assert_eq!(&bench_key(0, 4)[..], &[0, 0, 0, 0]);
        assert_eq!(&bench_key(1, 4)[..], &[2, 0, 0, 0]);
        assert_eq!(&bench_key(63, 2)[..], &[126, 0]);
        assert_eq!(&bench_key(64, 2)[..], &[0x80, 0x01]);
        assert_eq!(&bench_key(300, 3)[..], &[0xd8, 0x04, 0]);
    }

    #[test]
    fn key_size_must_hold_the_largest_key() {
        assert!(KeyPicker::new(64, 1, true).is_ok());
        assert!(KeyPicker::new(65, 1, true).is_err());
        assert!(KeyPicker::new(65, 2, true).is_ok());
        assert!(KeyPicker::new(0, 8, true).is_err());
    }

    #[test]
    fn sequential_keys_wrap_around_the_space() {
        let p = KeyPicker::new(3, 8, true).expect("valid");
        let numbers: Vec<u64> = (0..7).map(|n| p.number(n)).collect();
        assert_eq!(numbers, [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn random_keys_stay_in_the_space() {
        let p = KeyPicker::new(10, 8, false).expect("valid");
        assert!((0..1000).all(|n| p.number(n) < 10));
    }

    #[test]
    fn distinct_keys_differ() {
        let p = KeyPicker::new(5, 8, false).expect("valid");
        let keys = p.distinct_keys(0, 5);
        let set: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(set.len(), 5);
    }

    #[test]
    fn stamps_tell_their_age() {
        let epoch = Instant::now();
        let v = stamped_value(epoch, 32);
        assert_eq!(v.len(), 32);
        std::thread::sleep(Duration::from_millis(5));
        let age = stamp_age(epoch, &v).expect("stamped");
        assert!(age >= Duration::from_millis(5), "{age:?}");
        assert_eq!(stamped_value(epoch, 1).len(), STAMP_LEN);
        assert_eq!(stamp_age(epoch, b"short"), None);
    }
}
