//! One byte-pair encoding's vocabulary, kept compact, and the merges that count how
//! many tokens a piece of text becomes.
//!
//! The vocabularies are OpenAI's own `.tiktoken` files, packed (`vocab/pack.py`: each
//! token's bytes in rank order behind a one-byte length, zlib-compressed: 1.0 MB for
//! o200k_base, 0.45 MB for cl100k_base) and embedded in the binary. Unpacked, a
//! vocabulary is one buffer of every token's bytes, the offset where each ends, and an
//! open-addressing table from bytes to rank: 3.2 MB for o200k_base, 1.6 MB for
//! cl100k_base, built in some 10 ms.
//!
//! Counting follows tiktoken exactly: the piece's bytes start as single-byte parts,
//! and the adjacent pair whose joined bytes have the lowest rank is merged first (the
//! leftmost on a tie), until no pair is a token. Short pieces (nearly all of them) are
//! merged by scanning, as tiktoken does; long ones through a heap, so a megabyte of
//! one character costs `n log n`, not `n²`. Splitting text into pieces is
//! [`super::pieces`]' business.

use std::{cmp::Reverse, collections::BinaryHeap};

/// Pieces up to this many bytes are merged by scanning their parts; longer ones
/// through a heap.
const SCAN_MERGE_MAX: usize = 128;

/// A vocabulary: every token's bytes by rank, and a table to find a rank by bytes.
pub(super) struct Vocabulary {
    /// Every token's bytes, in rank order.
    bytes: Box<[u8]>,
    /// Where each rank's bytes end in `bytes` (they start where the previous end).
    ends: Box<[u32]>,
    /// Open addressing, linear probing: `rank + 1` of the token whose bytes hash here,
    /// or 0 for an empty slot. A power of two long, at most half full.
    slots: Box<[u32]>,
}

impl Vocabulary {
    /// Unpacks a vocabulary packed by `vocab/pack.py`. `Err` says what is wrong with it.
    pub(super) fn unpack(packed: &[u8]) -> Result<Self, String> {
        let records = miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(packed, 16 << 20)
            .map_err(|error| format!("cannot inflate: {error}"))?;
        let mut bytes = Vec::with_capacity(records.len());
        let mut ends = Vec::new();
        let mut rest = &records[..];
        while let [len, tail @ ..] = rest {
            let len = usize::from(*len);
            let token = tail.get(..len).filter(|_| len > 0).ok_or("a token record is cut short")?;
            bytes.extend_from_slice(token);
            ends.push(u32::try_from(bytes.len()).map_err(|_| "too many bytes")?);
            rest = &tail[len..];
        }
        let ranks = u32::try_from(ends.len()).map_err(|_| "too many tokens")?;
        let mut vocabulary = Self {
            bytes: bytes.into_boxed_slice(),
            ends: ends.into_boxed_slice(),
            slots: vec![0; (ranks as usize * 2).next_power_of_two()].into_boxed_slice(),
        };
        for rank in 0..ranks {
            vocabulary.insert(rank)?;
        }
        if (0..=u8::MAX).any(|byte| vocabulary.rank(&[byte]).is_none()) {
            return Err("not every single byte is a token".into());
        }
        Ok(vocabulary)
    }

    /// Tokens in the vocabulary.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.ends.len()
    }

    /// The bytes of the token of `rank`.
    pub(super) fn token(&self, rank: u32) -> &[u8] {
        let rank = rank as usize;
        let start = match rank {
            0 => 0,
            _ => self.ends[rank - 1] as usize,
        };
        &self.bytes[start..self.ends[rank] as usize]
    }

    /// The rank of the token whose bytes are `bytes`, if there is one.
    pub(super) fn rank(&self, bytes: &[u8]) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut slot = hash(bytes) & mask;
        loop {
            match self.slots[slot] {
                0 => return None,
                stored if self.token(stored - 1) == bytes => return Some(stored - 1),
                _ => slot = (slot + 1) & mask,
            }
        }
    }

    fn insert(&mut self, rank: u32) -> Result<(), String> {
        let mask = self.slots.len() - 1;
        let token = self.token(rank);
        let mut slot = hash(token) & mask;
        loop {
            match self.slots[slot] {
                0 => break,
                stored if self.token(stored - 1) == token => {
                    return Err(format!("the token of rank {rank} is listed twice"));
                }
                _ => slot = (slot + 1) & mask,
            }
        }
        self.slots[slot] = rank + 1;
        Ok(())
    }

    /// How many tokens `piece` (one piece of split text) encodes to.
    pub(super) fn count(&self, piece: &[u8]) -> usize {
        if piece.len() <= 1 || self.rank(piece).is_some() {
            return piece.len().min(1);
        }
        if piece.len() <= SCAN_MERGE_MAX { self.count_by_scan(piece) } else { self.count_by_heap(piece) }
    }

    /// The rank of the bytes from `start` to `end`, or `u32::MAX` when they are no token.
    fn pair_rank(&self, piece: &[u8], start: u32, end: u32) -> u32 {
        self.rank(&piece[start as usize..end as usize]).unwrap_or(u32::MAX)
    }

    /// tiktoken's own merge: scan for the lowest-ranked pair, merge it, again.
    fn count_by_scan(&self, piece: &[u8]) -> usize {
        // parts[i] = (where part i starts, rank of part i joined with part i + 1).
        let mut parts = [(0u32, u32::MAX); SCAN_MERGE_MAX + 1];
        let len = piece.len();
        for (i, part) in parts.iter_mut().enumerate().take(len) {
            let end = (i + 2).min(len) as u32;
            *part = (i as u32, if i + 1 < len { self.pair_rank(piece, i as u32, end) } else { u32::MAX });
        }
        parts[len] = (len as u32, u32::MAX);
        let mut count = len;
        loop {
            let parts = &mut parts[..=count];
            let Some((at, &(_, lowest))) =
                parts[..count].iter().enumerate().min_by_key(|(at, (_, rank))| (*rank, *at))
            else {
                break;
            };
            if lowest == u32::MAX {
                break;
            }
            // Part `at` absorbs part `at + 1`; its pair and its left neighbour's change.
            parts.copy_within(at + 2.., at + 1);
            count -= 1;
            let rank_at = |i: usize| match i + 2 <= count {
                true => self.pair_rank(piece, parts[i].0, parts[i + 2].0),
                false => u32::MAX,
            };
            let (merged, left) = (rank_at(at), at.checked_sub(1).map(rank_at));
            parts[at].1 = merged;
            if let Some(left) = left {
                parts[at - 1].1 = left;
            }
        }
        count
    }

    /// The same merges, the lowest pair found through a heap: for long pieces.
    fn count_by_heap(&self, piece: &[u8]) -> usize {
        let len = piece.len();
        let end = len as u32;
        // Parts as a linked list over their first byte: next[i] is where the part that
        // starts at byte i ends (and the next begins); rank[i] that of it joined with
        // the next part. A part absorbed by its left neighbour has next[i] = 0.
        let mut next: Vec<u32> = (1..=end).collect();
        let mut prev: Vec<u32> = (0..end).map(|i| i.wrapping_sub(1)).collect();
        let mut rank = vec![u32::MAX; len];
        let mut heap = BinaryHeap::with_capacity(len);
        let pair = |next: &[u32], start: u32| -> u32 {
            let middle = next[start as usize];
            if middle >= end {
                return u32::MAX;
            }
            self.pair_rank(piece, start, next[middle as usize])
        };
        for start in 0..end {
            rank[start as usize] = pair(&next, start);
            if rank[start as usize] != u32::MAX {
                heap.push(Reverse((rank[start as usize], start)));
            }
        }
        let mut count = len;
        while let Some(Reverse((lowest, start))) = heap.pop() {
            let at = start as usize;
            if next[at] == 0 || rank[at] != lowest {
                continue;
            }
            let absorbed = next[at] as usize;
            next[at] = next[absorbed];
            next[absorbed] = 0;
            if (next[at] as usize) < len {
                prev[next[at] as usize] = start;
            }
            count -= 1;
            rank[at] = pair(&next, start);
            if rank[at] != u32::MAX {
                heap.push(Reverse((rank[at], start)));
            }
            let left = prev[at];
            if left != u32::MAX {
                rank[left as usize] = pair(&next, left);
                if rank[left as usize] != u32::MAX {
                    heap.push(Reverse((rank[left as usize], left)));
                }
            }
        }
        count
    }
}

/// FxHash over the bytes, eight at a time: the keys are at most 128 bytes, and the
/// table's contents are fixed (nothing a caller sends is ever inserted), so its
/// longest probe is known when it is built.
fn hash(bytes: &[u8]) -> usize {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;
    let mut hash = bytes.len() as u64;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        hash = (hash.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(SEED);
    }
    let mut word = [0u8; 8];
    word[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    hash = (hash.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(SEED);
    (hash ^ (hash >> 29)) as usize
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use sha2::{Digest, Sha256};

    use super::*;

    /// The SHA-256 of OpenAI's published `.tiktoken` files (tiktoken's own
    /// `expected_hash` for each encoding).
    const PUBLISHED: [(&[u8], &str, usize); 2] = [
        (
            include_bytes!("vocab/o200k_base.zlib"),
            "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
            199_998,
        ),
        (
            include_bytes!("vocab/cl100k_base.zlib"),
            "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
            100_256,
        ),
    ];

    fn base64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
            let word = byte(0) << 16 | byte(1) << 8 | byte(2);
            for i in 0..4 {
                let digit = ALPHABET[(word >> (18 - 6 * i) & 63) as usize] as char;
                text.push(if i <= chunk.len() { digit } else { '=' });
            }
        }
        text
    }

    #[test]
    fn the_embedded_vocabularies_are_openais_byte_for_byte() {
        for (packed, published, tokens) in PUBLISHED {
            let vocabulary = Vocabulary::unpack(packed).expect("unpacks");
            assert_eq!(vocabulary.len(), tokens);
            let mut tiktoken = Sha256::new();
            for rank in 0..tokens as u32 {
                tiktoken.update(format!("{} {rank}\n", base64(vocabulary.token(rank))));
                assert_eq!(vocabulary.rank(vocabulary.token(rank)), Some(rank));
            }
            assert_eq!(hex::encode(tiktoken.finalize()), published);
        }
    }

    #[test]
    fn damaged_data_is_an_error_not_a_panic() {
        let (packed, _, _) = PUBLISHED[1];
        assert!(Vocabulary::unpack(&packed[..packed.len() / 2]).is_err());
        assert!(Vocabulary::unpack(b"not zlib").is_err());
        let twice = miniz_oxide::deflate::compress_to_vec_zlib(b"\x01a\x01a", 6);
        assert!(Vocabulary::unpack(&twice).is_err());
    }

    fn cl100k() -> &'static Vocabulary {
        static VOCABULARY: std::sync::OnceLock<Vocabulary> = std::sync::OnceLock::new();
        VOCABULARY.get_or_init(|| Vocabulary::unpack(PUBLISHED[1].0).expect("unpacks"))
    }

    proptest! {
        #[test]
        fn heap_and_scan_merge_alike(piece in "[ab ]{2,100}|(ab|ba|a|aaa|xyz){1,40}") {
            let vocabulary = cl100k();
            prop_assert_eq!(vocabulary.count_by_scan(piece.as_bytes()), vocabulary.count_by_heap(piece.as_bytes()));
        }
    }

    #[test]
    fn a_long_run_of_one_byte_is_counted_without_quadratic_work() {
        let spaces = vec![b' '; 1 << 18];
        let count = cl100k().count(&spaces);
        assert!(count > 0 && count < spaces.len() / 2, "{count}");
    }
}
