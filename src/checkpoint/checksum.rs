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
