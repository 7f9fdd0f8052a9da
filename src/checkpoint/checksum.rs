//! The checkpoint checksum: FNV-1a over the metadata, the unit list and every tensor byte.

pub(super) const CHECKSUM_PREFIX: &str = "fnv1a64x4:";

/// FNV-1a (64-bit) over 64-bit little-endian words, in four interleaved lanes so that the four
/// multiply chains run in parallel (byte-wise FNV-1a is ~10x slower on GB-sized checkpoints).
///
/// Each step `h = (h ^ word) * FNV_PRIME` is a bijection of `h` for a fixed word and of the word
/// for a fixed `h`, so changing any single word (any burst of flipped bits within 8 aligned
/// bytes) always changes the result; wider damage goes undetected with probability ~2^-64.
/// Tensor data is hashed as the sequence of its 8-byte words, a trailing partial word
/// zero-padded; the length is hashed too.
#[derive(Clone, Copy)]
pub(super) struct Checksum {
    h: u64,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Checksum {
    fn new() -> Self {
        Checksum { h: FNV_OFFSET }
    }
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.h = (self.h ^ x as u64).wrapping_mul(FNV_PRIME);
        }
    }
    fn u64(&mut self, x: u64) {
        self.bytes(&x.to_le_bytes());
    }
    /// A length-prefixed string (so that concatenations are unambiguous).
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.bytes(s.as_bytes());
    }
    fn finish(self) -> u64 {
        self.h
    }
}

/// The four-lane word hash of one tensor's data, given as its words.
fn hash_words(n_bytes: u64, words: impl Iterator<Item = u64>) -> u64 {
    let mut lanes = [FNV_OFFSET ^ 1, FNV_OFFSET ^ 2, FNV_OFFSET ^ 3, FNV_OFFSET ^ 4];
    for (i, w) in words.enumerate() {
        let l = &mut lanes[i & 3];
        *l = (*l ^ w).wrapping_mul(FNV_PRIME);
    }
    let mut c = Checksum::new();
    c.u64(n_bytes);
    for l in lanes {
        c.u64(l);
    }
    c.finish()
}

/// Data hash of a tensor from its little-endian bytes (load side).
pub(crate) fn hash_bytes(data: &[u8]) -> u64 {
    let chunks = data.chunks_exact(8);
    let rem = chunks.remainder();
    let tail = (!rem.is_empty()).then(|| {
        let mut w = [0u8; 8];
        w[..rem.len()].copy_from_slice(rem);
        u64::from_le_bytes(w)
    });
    hash_words(data.len() as u64, chunks.map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).chain(tail))
}

/// Data hash of an f32 tensor from its values (save side); equals `hash_bytes` of its LE bytes.
pub(crate) fn hash_f32(x: &[f32]) -> u64 {
    let pairs = x.chunks_exact(2);
    let tail = pairs.remainder().first().map(|v| v.to_bits() as u64);
    hash_words(4 * x.len() as u64, pairs.map(|p| p[0].to_bits() as u64 | (p[1].to_bits() as u64) << 32).chain(tail))
}

/// The file checksum: the two JSON strings, then per tensor (in name order) its name, length
/// and data hash.
pub(super) fn file_checksum<'a>(meta_json: &str, units_json: &str, tensors: impl Iterator<Item = (&'a str, u64, u64)>) -> String {
    let mut c = Checksum::new();
    c.str(meta_json);
    c.str(units_json);
    for (name, numel, data_hash) in tensors {
        c.str(name);
        c.u64(numel);
        c.u64(data_hash);
    }
    format!("{CHECKSUM_PREFIX}{:016x}", c.finish())
}

/// [`hash_bytes`] fed in pieces: a tensor's data streamed from a file in chunks of any size,
/// with the same result as hashing it in one slice.
pub(super) struct StreamHash {
    lanes: [u64; 4],
    words: usize,
    n_bytes: u64,
    pending: [u8; 8],
    pending_len: usize,
}

impl StreamHash {
    pub(super) fn new() -> Self {
        StreamHash {
            lanes: [FNV_OFFSET ^ 1, FNV_OFFSET ^ 2, FNV_OFFSET ^ 3, FNV_OFFSET ^ 4],
            words: 0,
            n_bytes: 0,
            pending: [0; 8],
            pending_len: 0,
        }
    }

    fn word(&mut self, w: u64) {
        let l = &mut self.lanes[self.words & 3];
        *l = (*l ^ w).wrapping_mul(FNV_PRIME);
        self.words += 1;
    }

    pub(super) fn feed(&mut self, mut data: &[u8]) {
        self.n_bytes += data.len() as u64;
        if self.pending_len > 0 {
            let take = (8 - self.pending_len).min(data.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&data[..take]);
            self.pending_len += take;
            data = &data[take..];
            if self.pending_len < 8 {
                return;
            }
            let w = u64::from_le_bytes(self.pending);
            self.word(w);
            self.pending_len = 0;
        }
        let chunks = data.chunks_exact(8);
        let rem = chunks.remainder();
        for c in chunks {
            self.word(u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
        }
        self.pending[..rem.len()].copy_from_slice(rem);
        self.pending_len = rem.len();
    }

    pub(super) fn finish(mut self) -> u64 {
        if self.pending_len > 0 {
            let mut w = [0u8; 8];
            w[..self.pending_len].copy_from_slice(&self.pending[..self.pending_len]);
            self.word(u64::from_le_bytes(w));
        }
        let mut c = Checksum::new();
        c.u64(self.n_bytes);
        for l in self.lanes {
            c.u64(l);
        }
        c.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_hash_equals_the_one_slice_hash_for_any_chunking() {
        let data: Vec<u8> = (0..1001u32).map(|i| (i.wrapping_mul(2654435761) >> 7) as u8).collect();
        for len in [0, 1, 7, 8, 9, 64, 1001] {
            let want = hash_bytes(&data[..len]);
            for chunk in [1, 3, 8, 13, 1000] {
                let mut s = StreamHash::new();
                for c in data[..len].chunks(chunk) {
                    s.feed(c);
                }
                assert_eq!(s.finish(), want, "len {len} chunk {chunk}");
            }
        }
    }
}
