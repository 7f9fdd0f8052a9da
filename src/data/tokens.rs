//! [`Tokens`]: one split's token stream, as the shards it spans (open files read window by
//! window, see [`super::shard::open_shard`]) or as an owned vector (tests, benchmarks,
//! synthetic data).
//!
//! A window may cross from one shard into the next: the stream is the shards' concatenation in
//! file-name order, exactly as if they had been read into one vector. Cloning is cheap (the
//! parts are shared), so every loader and every evaluation reads the same open files.

use super::shard::ShardFile;
use anyhow::Result;
use std::sync::Arc;

#[derive(Debug)]
enum Part {
    File(ShardFile),
    Owned(Vec<u32>),
}

impl Part {
    fn len(&self) -> usize {
        match self {
            Part::File(m) => m.header.count,
            Part::Owned(v) => v.len(),
        }
    }

    fn read_into(&self, start: usize, n: usize, out: &mut Vec<u32>) -> Result<()> {
        match self {
            Part::File(m) => m.read_into(start, n, out),
            Part::Owned(v) => {
                out.extend_from_slice(&v[start..start + n]);
                Ok(())
            }
        }
    }
}

/// A token stream; see the module docs.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    parts: Arc<Vec<Part>>,
    /// `starts[i]`: the stream position of part `i`'s first token; one more entry, the length.
    starts: Arc<Vec<usize>>,
}

impl Tokens {
    /// The stream of open shards, in the given order.
    pub fn shards(shards: Vec<ShardFile>) -> Tokens {
        Tokens::of(shards.into_iter().map(Part::File).collect())
    }

    fn of(parts: Vec<Part>) -> Tokens {
        let parts: Vec<Part> = parts.into_iter().filter(|p| p.len() > 0).collect();
        let mut starts = Vec::with_capacity(parts.len() + 1);
        let mut at = 0;
        starts.push(0);
        for p in &parts {
            at += p.len();
            starts.push(at);
        }
        Tokens { parts: Arc::new(parts), starts: Arc::new(starts) }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        *self.starts.last().unwrap_or(&0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of parts (shards) the stream spans.
    pub fn parts(&self) -> usize {
        self.parts.len()
    }

    /// Appends tokens `start .. start + n` to `out`; an error if a shard cannot be read. Panics
    /// if the range is out of bounds, as a slice index would: callers draw their ranges from
    /// [`Tokens::len`].
    pub fn read_into(&self, start: usize, n: usize, out: &mut Vec<u32>) -> Result<()> {
        assert!(start + n <= self.len(), "tokens {start}..{} of a stream of {}", start + n, self.len());
        // The last part whose first token is at or before `start`.
        let mut i = self.starts.partition_point(|&s| s <= start) - 1;
        let (mut pos, mut left) = (start, n);
        while left > 0 {
            let local = pos - self.starts[i];
            let take = (self.parts[i].len() - local).min(left);
            self.parts[i].read_into(local, take, out)?;
            pos += take;
            left -= take;
            i += 1;
        }
        Ok(())
    }

    /// Tokens `start .. start + n` as a vector.
    pub fn window(&self, start: usize, n: usize) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(n);
        self.read_into(start, n, &mut out)?;
        Ok(out)
    }

    /// The whole stream as a vector (tests and small data only).
    pub fn to_vec(&self) -> Result<Vec<u32>> {
        self.window(0, self.len())
    }
}

impl From<Vec<u32>> for Tokens {
    fn from(v: Vec<u32>) -> Tokens {
        Tokens::of(vec![Part::Owned(v)])
    }
}

impl From<Vec<u16>> for Tokens {
    fn from(v: Vec<u16>) -> Tokens {
        Tokens::from(v.into_iter().map(u32::from).collect::<Vec<u32>>())
    }
}

impl From<&[u32]> for Tokens {
    fn from(v: &[u32]) -> Tokens {
        Tokens::from(v.to_vec())
    }
}

/// Streams made of several owned pieces, for tests of windows across part boundaries.
impl From<Vec<Vec<u32>>> for Tokens {
    fn from(v: Vec<Vec<u32>>) -> Tokens {
        Tokens::of(v.into_iter().map(Part::Owned).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::Tokens;

    #[test]
    fn windows_across_parts_equal_the_concatenation() {
        let pieces: Vec<Vec<u32>> = vec![(0..5).collect(), vec![], (5..6).collect(), (6..20).collect()];
        let flat: Vec<u32> = (0..20).collect();
        let t = Tokens::from(pieces);
        assert_eq!(t.len(), 20);
        assert_eq!(t.parts(), 3);
        for s in 0..20 {
            for n in 0..=(20 - s) {
                assert_eq!(t.window(s, n).unwrap(), flat[s..s + n], "window {s}+{n}");
            }
        }
    }
}
