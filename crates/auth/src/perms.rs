//! etcd's key permissions as intervals: whether the permissions a user's
//! roles grant cover a key or a range of keys.
//!
//! A permission (and a request) names a key (`range_end` empty), the range
//! `[key, range_end)`, or every key from `key` on (`range_end` is `"\0"`).

use cairn_api::authpb::Permission;
use cairn_api::authpb::permission::Type as PermType;

/// What a request does to the keys it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Access {
    /// Whether a permission of type `perm_type` grants this access.
    fn granted_by(self, perm_type: i32) -> bool {
        match PermType::try_from(perm_type) {
            Ok(PermType::Readwrite) => true,
            Ok(PermType::Read) => self == Access::Read,
            Ok(PermType::Write) => self == Access::Write,
            Err(_) => false,
        }
    }
}

/// `[begin, end)`, `end` `None` for no upper bound.
struct Interval<'a> {
    begin: &'a [u8],
    end: Option<Vec<u8>>,
}

/// The interval of keys that a key and a range end in etcd's encoding name.
fn interval<'a>(key: &'a [u8], range_end: &[u8]) -> Interval<'a> {
    let end = match range_end {
        [] => {
            // One key: up to its immediate successor.
            let mut next = key.to_vec();
            next.push(0);
            Some(next)
        }
        [0] => None,
        end => Some(end.to_vec()),
    };
    Interval { begin: key, end }
}

/// Whether `perms` (of every role of one user) grant `access` to every key
/// that `key`/`range_end` name.
pub fn covers<'a>(
    perms: impl Iterator<Item = &'a Permission>,
    access: Access,
    key: &[u8],
    range_end: &[u8],
) -> bool {
    let granted: Vec<Interval<'_>> = perms
        .filter(|p| access.granted_by(p.perm_type))
        .map(|p| interval(&p.key, &p.range_end))
        .collect();
    let wanted = interval(key, range_end);
    // Sweep from the start of the wanted range: each step jumps to the
    // furthest end of a granted interval holding the cursor.
    let mut cursor = wanted.begin.to_vec();
    loop {
        if let Some(end) = &wanted.end
            && cursor >= *end
        {
            return true;
        }
        let holding = granted
            .iter()
            .filter(|g| g.begin <= cursor.as_slice() && g.end.as_ref().is_none_or(|e| cursor < *e));
        let mut furthest: Option<&Option<Vec<u8>>> = None;
        for g in holding {
            furthest = match (furthest, &g.end) {
                (Some(None), _) | (_, None) => Some(&None),
                (Some(Some(best)), Some(e)) if best >= e => furthest,
                (_, end) => Some(end),
            };
        }
        match furthest {
            None => return false,
            Some(None) => return true,
            Some(Some(end)) => cursor = end.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perm(perm_type: PermType, key: &str, range_end: &str) -> Permission {
        Permission {
            perm_type: perm_type as i32,
            key: key.as_bytes().to_vec().into(),
            range_end: range_end.as_bytes().to_vec().into(),
        }
    }

    fn check(perms: &[Permission], access: Access, key: &str, range_end: &str) -> bool {
        covers(perms.iter(), access, key.as_bytes(), range_end.as_bytes())
    }

    #[test]
    fn single_keys() {
        let perms = [perm(PermType::Read, "foo", "")];
        assert!(check(&perms, Access::Read, "foo", ""));
        assert!(!check(&perms, Access::Write, "foo", ""));
        assert!(!check(&perms, Access::Read, "foo1", ""));
        assert!(!check(&perms, Access::Read, "fo", ""));
        // A range of exactly that key is that key.
        assert!(check(&perms, Access::Read, "foo", "foo\0"));
        assert!(!check(&perms, Access::Read, "foo", "fop"));
    }

    #[test]
    fn ranges_and_prefixes() {
        let perms = [perm(PermType::Readwrite, "/app/", "/app0")];
        assert!(check(&perms, Access::Write, "/app/x", ""));
        assert!(check(&perms, Access::Read, "/app/", "/app0"));
        assert!(check(&perms, Access::Read, "/app/a", "/app/b"));
        assert!(!check(&perms, Access::Read, "/app/", "/app1"));
        assert!(!check(&perms, Access::Read, "/other/", ""));
        assert!(!check(&perms, Access::Read, "/app/", "\0"));
    }

    #[test]
    fn adjacent_and_overlapping_permissions_join() {
        let perms = [
            perm(PermType::Read, "a", "c"),
            perm(PermType::Readwrite, "b", "e"),
            perm(PermType::Write, "e", "g"),
        ];
        assert!(check(&perms, Access::Read, "a", "e"));
        assert!(!check(&perms, Access::Read, "a", "f"));
        assert!(check(&perms, Access::Write, "b", "g"));
        assert!(!check(&perms, Access::Write, "a", "g"));
    }

    #[test]
    fn open_ended_permissions() {
        let from_z = [perm(PermType::Readwrite, "z", "\0")];
        assert!(check(&from_z, Access::Write, "z1", ""));
        assert!(check(&from_z, Access::Write, "\u{7f}\u{7f}", ""));
        assert!(check(&from_z, Access::Read, "z", "\0"));
        assert!(!check(&from_z, Access::Write, "x", ""));
        assert!(!check(&from_z, Access::Read, "y", "\0"));
        let all = [perm(PermType::Readwrite, "", "\0")];
        assert!(check(&all, Access::Read, "\0", "\0"));
        assert!(check(&all, Access::Write, "anything", ""));
        assert!(!check(&[], Access::Read, "k", ""));
    }
}
