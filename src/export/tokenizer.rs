//! The tokenizer travels with the model: `export` writes `tokenizer.json`,
//! `tokenizer_config.json` and `generation_config.json` beside the weights, so that
//! `AutoTokenizer` and `AutoModelForCausalLM` both load the folder.
//!
//! - `bytes`: a byte-level BPE without merges whose token for byte `b` has id `b` (taproot's ids);
//! - `gpt2`: GPT-2's tokenizer, rebuilt from the tiktoken ranks taproot encodes with (the merges
//!   are recovered by replaying BPE on each token's bytes), `<|endoftext|>` = 50256;
//! - `bpe:N`: the learnt tokenizer saved beside the run's shards;
//! - `hf:PATH`: the file itself, with the `tokenizer_config.json` and `special_tokens_map.json`
//!   beside it when there are.
//!
//! The BOS/EOS ids the tokenizer has are also written into `config.json` and
//! `generation_config.json`, or `null` where it has none: never an id outside the vocabulary.

use crate::config::Config;
use anyhow::{anyhow, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerImpl};

/// The files an export may write besides the weights and `config.json`.
pub const FILES: &[&str] = &["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"];

/// The special ids of an exported tokenizer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Specials {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Their spellings.
    pub bos_text: Option<String>,
    pub eos_text: Option<String>,
    /// Where the tokenizer came from, or why none was written.
    pub note: String,
}

/// GPT-2's map from bytes to the printable characters byte-level BPE spells them with.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut out = ['\0'; 256];
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut n = 0;
    for b in 0..256u32 {
        out[b as usize] = if printable(b) {
            char::from_u32(b).expect("a char")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("a char")
        };
    }
    out
}

fn spell(bytes: &[u8], map: &[char; 256]) -> String {
    bytes.iter().map(|&b| map[b as usize]).collect()
}

type Bbpe = TokenizerImpl<BPE, tokenizers::NormalizerWrapper, ByteLevel, tokenizers::PostProcessorWrapper, ByteLevel>;

fn byte_level_bpe(vocab: HashMap<String, u32>, merges: Vec<(String, String)>, use_regex: bool) -> Result<Bbpe> {
    let vocab: tokenizers::models::bpe::Vocab = vocab.into_iter().collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| anyhow!("building the BPE: {e}"))?;
    let mut tok: Bbpe = TokenizerImpl::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, use_regex)));
    tok.with_decoder(Some(ByteLevel::new(false, true, use_regex)));
    Ok(tok)
}

/// `bytes` as a Hugging Face tokenizer: one token per byte, id = byte value.
pub fn bytes_tokenizer() -> Result<Bbpe> {
    let map = bytes_to_unicode();
    let vocab = (0..256u32).map(|b| (map[b as usize].to_string(), b)).collect();
    byte_level_bpe(vocab, Vec::new(), false)
}

/// GPT-2's tokenizer, rebuilt from the r50k ranks: token `r`'s merge is the last pair BPE joins
/// when it encodes the token's bytes with the ranks below `r`.
pub fn gpt2_tokenizer() -> Result<Bbpe> {
    let core = tiktoken_rs::r50k_base().map_err(|e| anyhow!("the gpt2 ranks: {e}"))?;
    let n = crate::data::GPT2_EOT;
    let mut tokens: Vec<Vec<u8>> = Vec::with_capacity(n as usize);
    for id in 0..n {
        tokens.push(core.decode_bytes(&[id]).map_err(|e| anyhow!("gpt2 token {id}: {e}"))?);
    }
    let rank: HashMap<&[u8], u32> = tokens.iter().enumerate().map(|(i, t)| (t.as_slice(), i as u32)).collect();
    let map = bytes_to_unicode();
    let mut merges = Vec::new();
    for (r, t) in tokens.iter().enumerate() {
        if t.len() < 2 {
            continue;
        }
        let mut parts: Vec<&[u8]> = (0..t.len()).map(|i| &t[i..i + 1]).collect();
        while parts.len() > 2 {
            // The adjacent pair of lowest rank below r.
            let best = (0..parts.len() - 1)
                .filter_map(|i| {
                    let joined = &t[offset(&parts, i, t)..offset(&parts, i + 2, t)];
                    rank.get(joined).filter(|&&k| (k as usize) < r).map(|&k| (k, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let a = offset(&parts, i, t);
            let b = offset(&parts, i + 2, t);
            parts.splice(i..i + 2, [&t[a..b]]);
        }
        if parts.len() == 2 {
            merges.push((spell(parts[0], &map), spell(parts[1], &map)));
        }
    }
    let vocab = tokens.iter().enumerate().map(|(i, t)| (spell(t, &map), i as u32)).collect();
    let mut tok = byte_level_bpe(vocab, merges, true)?;
    tok.add_special_tokens(&[AddedToken::from("<|endoftext|>", true)]);
    Ok(tok)
}

/// Byte offset of `parts[i]` within `t` (the parts tile `t`).
fn offset(parts: &[&[u8]], i: usize, t: &[u8]) -> usize {
    parts.get(i).map_or(t.len(), |p| p.as_ptr() as usize - t.as_ptr() as usize)
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)? + "\n").with_context(|| format!("writing {}", path.display()))
}

/// Writes the run's tokenizer into `out` and says its special ids. A `bpe:N` whose merges are
/// not where the run's shards were is not written (the note says so) rather than failing the
/// export of the weights.
pub fn write(cfg: &Config, out: &Path, max_seq: usize) -> Result<Specials> {
    write_named(&cfg.data.tokenizer, cfg.data.home(), out, max_seq)
}

/// [`write`] for the tokenizer called `name`, a `bpe:N`'s merges being in `home`
/// (`taproot data tokenizer NAME --out DIR`).
pub fn write_named(name: &str, home: &Path, out: &Path, max_seq: usize) -> Result<Specials> {
    let file = out.join("tokenizer.json");
    let save = |t: &Bbpe| t.save(&file, true).map_err(|e| anyhow!("writing {}: {e}", file.display()));
    let (specials, copied_config) = match name {
        "bytes" => {
            save(&bytes_tokenizer()?)?;
            (Specials { note: "bytes (id = byte value)".into(), ..Default::default() }, false)
        }
        "gpt2" => {
            save(&gpt2_tokenizer()?)?;
            let eot = Some(crate::data::GPT2_EOT);
            let text = Some("<|endoftext|>".to_string());
            (Specials { bos: eot, eos: eot, bos_text: text.clone(), eos_text: text, note: "GPT-2's".into() }, false)
        }
        n if n.starts_with("bpe:") => match crate::data::bpe::load(home) {
            Ok(t) => {
                t.save(&file, true).map_err(|e| anyhow!("writing {}: {e}", file.display()))?;
                (Specials { note: format!("{n}, from {}", home.display()), ..Default::default() }, false)
            }
            Err(e) => return Ok(Specials { note: format!("none written: {e:#}"), ..Default::default() }),
        },
        n => {
            let path = n.strip_prefix("hf:").ok_or_else(|| anyhow!("unknown tokenizer {n:?}"))?;
            let t = crate::data::hf_tokenizer::HfTokenizer::load(Path::new(path))?;
            std::fs::copy(&t.file, &file).with_context(|| format!("copying {} to {}", t.file.display(), file.display()))?;
            let mut copied = false;
            for extra in ["tokenizer_config.json", "special_tokens_map.json"] {
                let from: PathBuf = t.file.with_file_name(extra);
                if from.is_file() {
                    std::fs::copy(&from, out.join(extra)).with_context(|| format!("copying {}", from.display()))?;
                    copied |= extra == "tokenizer_config.json";
                }
            }
            let text = |id: Option<u32>| id.and_then(|i| t.inner.id_to_token(i));
            (
                Specials { bos: t.bos, eos: t.eos, bos_text: text(t.bos), eos_text: text(t.eos), note: format!("{}", t.file.display()) },
                copied,
            )
        }
    };
    if !copied_config {
        write_json(
            &out.join("tokenizer_config.json"),
            &serde_json::json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": max_seq,
                "bos_token": specials.bos_text,
                "eos_token": specials.eos_text,
                "pad_token": null,
                "unk_token": null,
                "add_prefix_space": false,
                "clean_up_tokenization_spaces": false,
            }),
        )?;
    }
    write_json(
        &out.join("generation_config.json"),
        &serde_json::json!({
            "_from_model_config": true,
            "bos_token_id": specials.bos,
            "eos_token_id": specials.eos,
            "pad_token_id": null,
        }),
    )?;
    Ok(specials)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_byte_map_is_a_bijection_onto_printable_chars() {
        let m = super::bytes_to_unicode();
        let set: std::collections::HashSet<char> = m.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(m[b'a' as usize], 'a');
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
    }
}
