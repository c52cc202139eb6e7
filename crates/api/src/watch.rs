//! Watch responses as etcd sends them.

use prost::Message as _;

use crate::etcdserverpb::WatchResponse;

/// etcd's `sendFragments`: a response larger than `max_bytes` with more
/// than one event goes out in parts of at least one event each, all but the
/// last marked `fragment`.
pub fn fragments(response: WatchResponse, max_bytes: usize) -> Vec<WatchResponse> {
    if response.encoded_len() < max_bytes || response.events.len() < 2 {
        return vec![response];
    }
    let mut events = response.events;
    let base = WatchResponse {
        events: Vec::new(),
        fragment: true,
        ..response
    };
    let base_len = base.encoded_len();
    let mut parts = Vec::new();
    let mut part = Vec::new();
    let mut size = base_len;
    for event in events.drain(..) {
        // Tag byte, length prefix, body: what the event adds to a response.
        let len = event.encoded_len();
        let added = 1 + prost::length_delimiter_len(len) + len;
        if !part.is_empty() && size + added >= max_bytes {
            parts.push(WatchResponse {
                events: std::mem::take(&mut part),
                ..base.clone()
            });
            size = base_len;
        }
        size += added;
        part.push(event);
    }
    parts.push(WatchResponse {
        events: part,
        fragment: false,
        ..base
    });
    parts
}

#[cfg(test)]
mod tests {
    use prost::bytes::Bytes;

    use super::*;
    use crate::mvccpb::{Event, KeyValue};

    fn event(size: usize) -> Event {
        Event {
            kv: Some(KeyValue {
                key: Bytes::from_static(b"k"),
                value: Bytes::from(vec![b'x'; size]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn large_responses_split_into_fragments_of_whole_events() {
        let response = WatchResponse {
            watch_id: 3,
            events: (0..5).map(|_| event(100)).collect(),
            ..Default::default()
        };
        let small = fragments(response.clone(), 10_000);
        assert_eq!(small, vec![response.clone()]);
        let parts = fragments(response, 250);
        assert_eq!(parts.len(), 3);
        assert_eq!(
            parts.iter().map(|p| p.events.len()).collect::<Vec<_>>(),
            vec![2, 2, 1]
        );
        assert_eq!(
            parts.iter().map(|p| p.fragment).collect::<Vec<_>>(),
            vec![true, true, false]
        );
        assert!(parts.iter().all(|p| p.watch_id == 3));
        // A single event too large still goes out whole.
        let one = WatchResponse {
            events: vec![event(1000)],
            ..Default::default()
        };
        assert_eq!(fragments(one.clone(), 10), vec![one]);
    }
}
