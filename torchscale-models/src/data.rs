//! A byte-level text corpus for language-model training: no tokenizer to train or ship.
//!
//! Ids follow fairseq's dictionary layout, so torchscale's `padding_idx = 1` holds: `0` is `<s>`
//! (the begin-of-sequence token a generation starts from), `1` `<pad>`, `2` `</s>`, `3` `<unk>`,
//! and byte `b` is id `b + 4`: a vocabulary of [`BYTE_VOCAB`] = 260.
//!
//! ```
//! use torchscale_models::data::ByteCorpus;
//! # fn main() -> torchscale_core::Result<()> {
//! let text = "one line\n".repeat(40);
//! let corpus = ByteCorpus::from_text(&text, 0.1)?;
//! let (input, target) = corpus.train_batch(2, 8, 7, &candle_core::Device::Cpu)?;
//! assert_eq!(input.dims(), &[2, 8]);
//! // The target is the input shifted by one byte.
//! let (i, t): (Vec<Vec<u32>>, Vec<Vec<u32>>) = (input.to_vec2()?, target.to_vec2()?);
//! assert_eq!(i[0][1..], t[0][..7]);
//! assert_eq!(ByteCorpus::decode(&ByteCorpus::encode("héllo")), "héllo");
//! # Ok(()) }
//! ```

use std::path::Path;

use candle_core::{Device, Tensor};
use rand::Rng;
use torchscale_core::init::seeded_rng;
use torchscale_core::{Error, Result};

/// The ChaCha stream of training-batch offsets (see [`torchscale_core::init::seeded_rng`]).
const BATCH_STREAM: u64 = 3;

/// `<s>`: the token generation starts from.
pub const BOS: u32 = 0;
/// `<pad>` (torchscale's `padding_idx`).
pub const PAD: u32 = 1;
/// `</s>`.
pub const EOS: u32 = 2;
/// First byte id: byte `b` is `b + BYTE_OFFSET`.
pub const BYTE_OFFSET: u32 = 4;
/// Vocabulary size: 4 special tokens and 256 bytes.
pub const BYTE_VOCAB: usize = 260;

/// A text split into training and validation byte streams.
#[derive(Debug, Clone)]
pub struct ByteCorpus {
    train: Vec<u32>,
    valid: Vec<u32>,
}

impl ByteCorpus {
    /// Splits `text` by lines: the last `valid_fraction` of the lines (at least one) are held out
    /// for validation.
    pub fn from_text(text: &str, valid_fraction: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&valid_fraction) {
            return Err(Error::config(
                "valid_fraction",
                format!("must be in [0, 1), got {valid_fraction}"),
            ));
        }
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        if lines.len() < 2 {
            return Err(Error::invalid(
                "corpus",
                "needs at least two lines (one to train on, one to validate)",
            ));
        }
        let n_valid =
            ((lines.len() as f64 * valid_fraction).ceil() as usize).clamp(1, lines.len() - 1);
        let cut = lines.len() - n_valid;
        Ok(Self {
            train: Self::encode(&lines[..cut].concat()),
            valid: Self::encode(&lines[cut..].concat()),
        })
    }

    /// Reads a UTF-8 (or any byte) text file; see [`ByteCorpus::from_text`].
    pub fn from_file(path: &Path, valid_fraction: f64) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_text(&String::from_utf8_lossy(&bytes), valid_fraction)
    }

    /// Byte ids of `s`.
    pub fn encode(s: &str) -> Vec<u32> {
        s.bytes().map(|b| b as u32 + BYTE_OFFSET).collect()
    }

    /// The text of byte ids; special tokens are dropped, invalid UTF-8 is replaced.
    pub fn decode(ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .filter(|&&i| (BYTE_OFFSET..BYTE_OFFSET + 256).contains(&i))
            .map(|&i| (i - BYTE_OFFSET) as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Training bytes.
    pub fn train_len(&self) -> usize {
        self.train.len()
    }

    /// Validation bytes.
    pub fn valid_len(&self) -> usize {
        self.valid.len()
    }

    /// `batch` windows of `seq_len + 1` bytes at offsets drawn from `seed`: `(input, target)`,
    /// each `[batch, seq_len]` u32, the target shifted by one. The same seed gives the same batch.
    pub fn train_batch(
        &self,
        batch: usize,
        seq_len: usize,
        seed: u64,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let span = check_len("train", self.train.len(), seq_len)?;
        let mut rng = seeded_rng(seed, BATCH_STREAM);
        let starts: Vec<usize> = (0..batch).map(|_| rng.random_range(0..span)).collect();
        windows(&self.train, &starts, seq_len, device)
    }

    /// Rank `rank`'s part of the global batch of [`ByteCorpus::train_batch`]`(batch, seq_len,
    /// seed)`: its rows `batch * rank / world .. batch * (rank + 1) / world`, so that `world`
    /// data-parallel ranks drawing with the same (seed, step) together see exactly the batch one
    /// process sees, each its own disjoint rows.
    pub fn train_batch_part(
        &self,
        batch: usize,
        seq_len: usize,
        seed: u64,
        rank: usize,
        world: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        if world == 0 || rank >= world {
            return Err(Error::config(
                "rank",
                format!("rank {rank} is not in a world of {world}"),
            ));
        }
        if batch < world {
            return Err(Error::config(
                "batch",
                format!("a global batch of {batch} rows leaves ranks of {world} without data"),
            ));
        }
        let span = check_len("train", self.train.len(), seq_len)?;
        let mut rng = seeded_rng(seed, BATCH_STREAM);
        // Every rank draws the whole batch's offsets (cheap) and keeps its rows.
        let starts: Vec<usize> = (0..batch).map(|_| rng.random_range(0..span)).collect();
        let part = &starts[batch * rank / world..batch * (rank + 1) / world];
        windows(&self.train, part, seq_len, device)
    }

    /// Consecutive non-overlapping validation windows, `batch` per tensor pair, at most
    /// `max_batches` pairs (all of the validation text when it fits).
    pub fn valid_batches(
        &self,
        batch: usize,
        seq_len: usize,
        max_batches: usize,
        device: &Device,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        let span = check_len("validation", self.valid.len(), seq_len)?;
        let starts: Vec<usize> = (0..span).step_by(seq_len).collect();
        starts
            .chunks(batch.max(1))
            .filter(|c| c.len() == batch)
            .take(max_batches)
            .map(|c| windows(&self.valid, c, seq_len, device))
            .collect()
    }
}

/// Number of valid window starts of a split.
fn check_len(split: &str, len: usize, seq_len: usize) -> Result<usize> {
    if seq_len == 0 {
        return Err(Error::config("seq_len", "must be at least 1"));
    }
    if len <= seq_len {
        return Err(Error::invalid(
            "corpus",
            format!(
                "the {split} split has {len} bytes, fewer than seq_len + 1 = {}",
                seq_len + 1
            ),
        ));
    }
    Ok(len - seq_len)
}

fn windows(
    ids: &[u32],
    starts: &[usize],
    seq_len: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut input = Vec::with_capacity(starts.len() * seq_len);
    let mut target = Vec::with_capacity(starts.len() * seq_len);
    for &s in starts {
        input.extend_from_slice(&ids[s..s + seq_len]);
        target.extend_from_slice(&ids[s + 1..s + seq_len + 1]);
    }
    let shape = (starts.len(), seq_len);
    Ok((
        Tensor::from_vec(input, shape, device)?,
        Tensor::from_vec(target, shape, device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_holds_out_the_last_lines() {
        let text: String = (0..20).map(|i| format!("line {i}\n")).collect();
        let c = ByteCorpus::from_text(&text, 0.1).unwrap();
        assert_eq!(ByteCorpus::decode(&c.valid), "line 18\nline 19\n");
        assert_eq!(c.train_len() + c.valid_len(), text.len());
    }

    #[test]
    fn batches_are_seeded_and_in_range() {
        let text: String = (0..50).map(|i| format!("verse {i}\n")).collect();
        let c = ByteCorpus::from_text(&text, 0.2).unwrap();
        let dev = Device::Cpu;
        let a = c
            .train_batch(4, 16, 3, &dev)
            .unwrap()
            .0
            .to_vec2::<u32>()
            .unwrap();
        let b = c
            .train_batch(4, 16, 3, &dev)
            .unwrap()
            .0
            .to_vec2::<u32>()
            .unwrap();
        let d = c
            .train_batch(4, 16, 4, &dev)
            .unwrap()
            .0
            .to_vec2::<u32>()
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(a, d);
        assert!(a
            .iter()
            .flatten()
            .all(|&i| (BYTE_OFFSET..BYTE_VOCAB as u32).contains(&i)));
        let v = c.valid_batches(2, 8, 100, &dev).unwrap();
        assert_eq!(v.len(), (c.valid_len() - 8).div_ceil(8) / 2);
    }

    /// The batch of (seed, step) is pinned: a resumed run and the README's numbers rely on it.
    #[test]
    fn batch_offsets_are_pinned() {
        let text: String = (0..50).map(|i| format!("verse {i:02}\n")).collect();
        let c = ByteCorpus::from_text(&text, 0.2).unwrap();
        let (input, target) = c.train_batch(2, 4, 11, &Device::Cpu).unwrap();
        let input = input.to_vec2::<u32>().unwrap();
        // "\nver" and " 08\n" (byte + BYTE_OFFSET).
        assert_eq!(input, [[14, 122, 105, 118], [36, 52, 60, 14]]);
        assert_eq!(target.to_vec2::<u32>().unwrap()[0][..3], input[0][1..]);
    }

    #[test]
    fn rank_parts_tile_the_global_batch() {
        let text: String = (0..50).map(|i| format!("verse {i:02}\n")).collect();
        let c = ByteCorpus::from_text(&text, 0.2).unwrap();
        let dev = Device::Cpu;
        let (whole, whole_t) = c.train_batch(5, 6, 9, &dev).unwrap();
        for world in 1..=5 {
            let parts: Vec<_> = (0..world)
                .map(|r| c.train_batch_part(5, 6, 9, r, world, &dev).unwrap())
                .collect();
            let rows: Vec<usize> = parts.iter().map(|p| p.0.dims()[0]).collect();
            assert_eq!(rows.iter().sum::<usize>(), 5, "world {world}: {rows:?}");
            let input = Tensor::cat(&parts.iter().map(|p| &p.0).collect::<Vec<_>>(), 0).unwrap();
            let target = Tensor::cat(&parts.iter().map(|p| &p.1).collect::<Vec<_>>(), 0).unwrap();
            assert_eq!(
                input.to_vec2::<u32>().unwrap(),
                whole.to_vec2::<u32>().unwrap()
            );
            assert_eq!(
                target.to_vec2::<u32>().unwrap(),
                whole_t.to_vec2::<u32>().unwrap()
            );
        }
        assert!(c.train_batch_part(5, 6, 9, 2, 2, &dev).is_err());
        assert!(c.train_batch_part(1, 6, 9, 0, 2, &dev).is_err());
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        assert!(matches!(
            ByteCorpus::from_text("only one line", 0.1),
            Err(Error::Invalid { .. })
        ));
        assert!(matches!(
            ByteCorpus::from_text("a\nb\n", 1.5),
            Err(Error::Config { .. })
        ));
        let c = ByteCorpus::from_text("ab\ncd\n", 0.5).unwrap();
        assert!(c.train_batch(1, 10, 0, &Device::Cpu).is_err());
        assert!(ByteCorpus::from_file(Path::new("/no/such/file"), 0.1).is_err());
    }
}
