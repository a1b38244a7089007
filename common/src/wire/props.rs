//! Property tests of state chunk assembly, which both sides run on chunks from a peer (a worker
//! fetching a state, the coordinator taking an upload): whatever the chunks claim — totals that
//! change or exceed the limit, offsets with gaps or overlaps, chunks out of order, repeated,
//! missing or oversized, versions that change — the assembler returns exactly the announced
//! bytes or refuses, and never allocates for what a chunk only announces.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

use super::*;
use crate::testing::{self, allocations};
use crate::{MAX_STATE_BYTES, STATE_CHUNK_BYTES};

/// An honest stream of `data` cut at `cuts`, tagged `version`.
fn honest(data: &[u8], cuts: &[Index], version: u64) -> Vec<pb::StateChunk> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(data.len() + 1)).collect();
    points.extend([0, data.len()]);
    points.sort_unstable();
    points.dedup();
    let chunks: Vec<pb::StateChunk> = points
        .windows(2)
        .map(|w| pb::StateChunk {
            total_bytes: data.len() as u64,
            offset: w[0] as u64,
            data: bytes::Bytes::copy_from_slice(&data[w[0]..w[1]]),
            state_version: version,
            member: 0,
        })
        .collect();
    if chunks.is_empty() {
        state_chunks(data, version, 0)
    } else {
        chunks
    }
}

/// One way a peer may lie about its chunks.
#[derive(Clone, Debug)]
enum Lie {
    Total(Index, u64),
    Offset(Index, u64),
    Version(Index, u64),
    Grow(Index, usize),
    Swap(Index, Index),
    Drop(Index),
    Repeat(Index),
}

fn lie() -> impl Strategy<Value = Lie> {
    let value = || {
        prop_oneof![
            0u64..64,
            Just(MAX_STATE_BYTES),
            Just(MAX_STATE_BYTES + 1),
            Just(u64::MAX),
            any::<u64>(),
        ]
    };
    prop_oneof![
        (any::<Index>(), value()).prop_map(|(i, v)| Lie::Total(i, v)),
        (any::<Index>(), value()).prop_map(|(i, v)| Lie::Offset(i, v)),
        (any::<Index>(), value()).prop_map(|(i, v)| Lie::Version(i, v)),
        (any::<Index>(), 1usize..64).prop_map(|(i, n)| Lie::Grow(i, n)),
        (any::<Index>(), any::<Index>()).prop_map(|(i, j)| Lie::Swap(i, j)),
        any::<Index>().prop_map(Lie::Drop),
        any::<Index>().prop_map(Lie::Repeat),
    ]
}

fn tell(chunks: &mut Vec<pb::StateChunk>, lie: &Lie) {
    if chunks.is_empty() {
        return;
    }
    let n = chunks.len();
    match lie {
        Lie::Total(i, v) => chunks[i.index(n)].total_bytes = *v,
        Lie::Offset(i, v) => chunks[i.index(n)].offset = *v,
        Lie::Version(i, v) => chunks[i.index(n)].state_version = *v,
        Lie::Grow(i, extra) => {
            let c = &mut chunks[i.index(n)];
            let mut data = c.data.to_vec();
            data.resize(data.len() + extra, 0xa5);
            c.data = data.into();
        }
        Lie::Swap(i, j) => chunks.swap(i.index(n), j.index(n)),
        Lie::Drop(i) => {
            chunks.remove(i.index(n));
        }
        Lie::Repeat(i) => {
            let c = chunks[i.index(n)].clone();
            chunks.insert(i.index(n), c);
        }
    }
}

/// What an honest reading of `chunks` gives: the bytes and version, when every chunk agrees on
/// the version and a total within the limit, and the chunks cover it exactly, in order.
fn expected(chunks: &[pb::StateChunk]) -> Option<(Vec<u8>, u64)> {
    let Some(first) = chunks.first() else {
        return Some((Vec::new(), 0));
    };
    let (total, version) = (first.total_bytes, first.state_version);
    if total > MAX_STATE_BYTES {
        return None;
    }
    let mut bytes = Vec::new();
    for c in chunks {
        if c.total_bytes != total || c.state_version != version || c.offset != bytes.len() as u64 {
            return None;
        }
        // Every chunk but the last is full; only an empty state has an empty chunk.
        let end = c.offset + c.data.len() as u64;
        let full = c.data.len() == STATE_CHUNK_BYTES;
        if !full && (end != total || (c.data.is_empty() && total > 0)) {
            return None;
        }
        bytes.extend_from_slice(&c.data);
    }
    (bytes.len() as u64 == total).then_some((bytes, version))
}

proptest! {
    #![proptest_config(testing::config(1024))]

    #[test]
    fn lying_chunk_streams_are_refused_and_honest_ones_reassemble_exactly(
        data in vec(any::<u8>(), 0..300),
        cuts in vec(any::<Index>(), 0..6),
        version in any::<u64>(),
        lies in vec(lie(), 0..3),
    ) {
        let mut chunks = honest(&data, &cuts, version);
        for l in &lies {
            tell(&mut chunks, l);
        }
        let want = expected(&chunks);
        let pushed: usize = chunks.iter().map(|c| c.data.len()).sum();
        let (got, seen) = allocations(|| {
            let mut asm = StateAssembler::default();
            for c in chunks.clone() {
                asm.push(c)?;
            }
            asm.finish()
        });
        // The buffer grows with what arrives, never with what a chunk announces.
        prop_assert!(
            seen.largest <= 2 * pushed + 1024,
            "{} bytes pushed, {} allocated at once", pushed, seen.largest
        );
        match (got, want) {
            (Ok(got), Some(want)) => prop_assert_eq!(got, want),
            (Err(e), None) => prop_assert!(e.contains("state"), "{}", e),
            (got, want) => prop_assert!(false, "assembled {:?}, expected {:?} from {:?}", got, want, chunks),
        }
    }
}

proptest! {
    #![proptest_config(testing::config(24))]

    #[test]
    fn states_of_any_size_are_chunked_and_reassembled_unchanged(
        len in prop_oneof![0usize..16, (STATE_CHUNK_BYTES - 2)..(STATE_CHUNK_BYTES + 2), 0usize..(3 * STATE_CHUNK_BYTES)],
        seed in any::<u8>(),
        version in any::<u64>(),
    ) {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        let chunks = state_chunks(&data, version, 0);
        prop_assert_eq!(chunks.len(), len.div_ceil(STATE_CHUNK_BYTES).max(1));
        prop_assert!(chunks.iter().all(|c| c.data.len() <= STATE_CHUNK_BYTES));
        let mut asm = StateAssembler::default();
        for c in chunks {
            asm.push(c).unwrap();
        }
        prop_assert_eq!(asm.finish().unwrap(), (data, version));
    }
}

#[test]
fn a_total_beyond_the_limit_is_refused_at_the_first_chunk() {
    let mut asm = StateAssembler::default();
    let err = asm
        .push(pb::StateChunk {
            total_bytes: MAX_STATE_BYTES + 1,
            offset: 0,
            data: bytes::Bytes::from_static(b"x"),
            state_version: 1,
            member: 0,
        })
        .unwrap_err();
    assert!(err.contains("at most"), "{err}");
}
