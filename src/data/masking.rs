//! RetroMAE masking (SPEC §6.2 with retrom3's decisions §10.1-10.3): encoder whole-word masking
//! with 80/10/10 replacement, decoder labels, the word index each key needs for the in-kernel
//! position-specific mask, and the `reference_compat` materialised masks of the reference code.

use super::rng::Rng;
use super::tokenizer::TextTokenizer;
use crate::error::{Error, Result};
use crate::model::encoder::EncoderInput;

/// Label value that the loss ignores.
pub const IGNORE: i64 = -100;

/// What masking needs to know about the vocabulary.
#[derive(Clone, Debug)]
pub struct MaskingVocab {
    pub cls: u32,
    pub eos: u32,
    pub pad: u32,
    pub mask: u32,
    /// `len(tokenizer)`: the range of random replacement ids.
    pub vocab_size: usize,
    /// Per id: the token starts a new word (SentencePiece "▁", WordPiece not "##", specials).
    pub word_start: Vec<bool>,
    /// Per id: a special token (never masked in the encoder; its own word).
    pub special: Vec<bool>,
}

impl MaskingVocab {
    /// A synthetic vocabulary of `n` ids (benchmarks, selftests, tests): XLM-R's specials
    /// (0 `<s>`, 1 `<pad>`, 2 `</s>`, 3 `<unk>`) and `<mask>` = n - 1; ids below 5 and those not
    /// divisible by 3 start a word, the others continue one.
    pub fn synthetic(n: usize) -> MaskingVocab {
        MaskingVocab {
            cls: 0,
            eos: 2,
            pad: 1,
            mask: n.saturating_sub(1) as u32,
            vocab_size: n,
            word_start: (0..n).map(|i| i < 5 || i % 3 != 0).collect(),
            special: (0..n).map(|i| i < 4 || i + 1 == n).collect(),
        }
    }

    /// Derive from a tokenizer: WordPiece vocabularies (some token starts with "##") mark
    /// continuations by "##"; otherwise SentencePiece-style "▁" marks word starts.
    pub fn from_tokenizer(tok: &TextTokenizer) -> Result<MaskingVocab> {
        let need = |v: Option<u32>, what: &str| {
            v.ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: the tokenizer has no {what} token",
                    tok.path().display()
                ))
            })
        };
        let (cls, eos, pad, mask) = (
            need(tok.cls_id(), "cls/<s>")?,
            need(tok.eos_id(), "sep/</s>")?,
            need(tok.pad_id(), "pad")?,
            need(tok.mask_id(), "mask")?,
        );
        let n = tok.vocab_size();
        let tokens: Vec<String> = (0..n as u32)
            .map(|i| tok.id_to_token(i).unwrap_or_default())
            .collect();
        let wordpiece = tokens.iter().any(|t| t.starts_with("##"));
        let mut special = vec![false; n];
        for id in tok.special_ids().into_iter().chain([mask]) {
            if (id as usize) < n {
                special[id as usize] = true;
            }
        }
        let word_start = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                special[i]
                    || if wordpiece {
                        !t.starts_with("##")
                    } else {
                        t.starts_with('\u{2581}')
                    }
            })
            .collect();
        Ok(MaskingVocab {
            cls,
            eos,
            pad,
            mask,
            vocab_size: n,
            word_start,
            special,
        })
    }

    fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    fn starts_word(&self, id: u32) -> bool {
        self.word_start.get(id as usize).copied().unwrap_or(true)
    }
}

/// Masking settings.
#[derive(Clone, Copy, Debug)]
pub struct MaskingConfig {
    /// Encoder mask ratio (paper 0.15-0.3; default 0.3).
    pub p_enc: f32,
    /// Decoder mask ratio (paper 0.5-0.7; default 0.5).
    pub p_dec: f32,
    /// Reproduce the reference code: token-level masking, specials maskable in the decoder matrix,
    /// at most 512 masked tokens, K pre-sampled decoder masks with a fixed count each.
    pub reference_compat: bool,
}

/// One RetroMAE training batch.
#[derive(Clone, Debug)]
pub struct RetroMaeBatch {
    /// Encoder input: masked ids and attention mask.
    pub enc: EncoderInput,
    /// \[B*L\] original id at encoder-masked positions, IGNORE elsewhere.
    pub enc_labels: Vec<i64>,
    /// Decoder content-stream input: the original ids (same attention mask).
    pub dec: EncoderInput,
    /// \[B*L\] original ids except position 0 and the last real position; IGNORE on padding.
    pub dec_labels: Vec<i64>,
    /// \[B*L\] whole-word index of each position (the decoder mask hides whole words).
    pub words: Vec<u32>,
    /// Seed of the in-kernel decoder mask of this batch.
    pub mask_seed: u64,
    /// reference_compat only: the materialised [B, L, L] decoder visibility.
    pub dense_visibility: Option<Vec<u8>>,
}

/// Word index per position: a new word at every word-start token, every special token, and every
/// token right after a special.
fn word_ids(ids: &[u32], v: &MaskingVocab, token_level: bool) -> Vec<u32> {
    let mut out = Vec::with_capacity(ids.len());
    let mut w = 0u32;
    for (i, &id) in ids.iter().enumerate() {
        let new = i == 0
            || token_level
            || v.starts_word(id)
            || v.is_special(id)
            || v.is_special(ids[i - 1]);
        if new && i > 0 {
            w += 1;
        }
        out.push(w);
    }
    out
}

/// HF `_whole_word_mask`: shuffle candidate words, add whole words while the total stays within
/// n = max(1, round(L·p)) (capped at `cap`); returns a 0/1 vector.
fn whole_word_mask(
    words: &[u32],
    candidate: &[bool],
    p: f32,
    cap: usize,
    rng: &mut Rng,
) -> Vec<bool> {
    let l = words.len();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for i in 0..l {
        if !candidate[i] {
            continue;
        }
        match groups.last_mut() {
            Some(g) if words[*g.last().expect("non-empty")] == words[i] => g.push(i),
            _ => groups.push(vec![i]),
        }
    }
    rng.shuffle(&mut groups);
    let n = ((l as f64 * p as f64).round() as usize).clamp(1, cap);
    let mut masked = vec![false; l];
    let mut count = 0;
    for g in groups {
        if count >= n {
            break;
        }
        if count + g.len() > n {
            continue;
        }
        for &i in &g {
            masked[i] = true;
        }
        count += g.len();
    }
    masked
}

/// Build one batch from documents of content ids (no specials; each gets `<s> … </s>`, truncated
/// to `max_len`). All randomness comes from `rng`.
pub fn make_batch(
    docs: &[&[u32]],
    v: &MaskingVocab,
    cfg: &MaskingConfig,
    max_len: usize,
    rng: &mut Rng,
) -> Result<RetroMaeBatch> {
    if max_len < 3 {
        return Err(Error::invalid(format!(
            "max_len {max_len}: RetroMAE needs at least 3 tokens"
        )));
    }
    let seqs: Vec<Vec<u32>> = docs
        .iter()
        .map(|d| {
            let mut s = Vec::with_capacity(d.len().min(max_len - 2) + 2);
            s.push(v.cls);
            s.extend_from_slice(&d[..d.len().min(max_len - 2)]);
            s.push(v.eos);
            s
        })
        .collect();
    let dec = EncoderInput::pad(&seqs, v.pad);
    let (b, l) = (dec.batch, dec.len);
    let mut enc_ids = dec.ids.clone();
    let mut enc_labels = vec![IGNORE; b * l];
    let mut dec_labels = vec![IGNORE; b * l];
    let mut words = vec![0u32; b * l];
    let cap = if cfg.reference_compat {
        512
    } else {
        usize::MAX
    };
    for (bi, s) in seqs.iter().enumerate() {
        let n = s.len();
        let w = word_ids(s, v, cfg.reference_compat);
        words[bi * l..bi * l + n].copy_from_slice(&w);
        // Encoder: whole words of non-special tokens (compat: every token but the specials is a
        // candidate at token level, specials are removed afterwards as HF's torch_mask_tokens does).
        let candidate: Vec<bool> = s.iter().map(|&id| !v.is_special(id)).collect();
        let m = whole_word_mask(&w, &candidate, cfg.p_enc, cap, rng);
        for (i, &mi) in m.iter().enumerate() {
            if !mi {
                continue;
            }
            let at = bi * l + i;
            enc_labels[at] = s[i] as i64;
            if rng.uniform() < 0.8 {
                enc_ids[at] = v.mask;
            } else if rng.uniform() < 0.5 {
                enc_ids[at] = rng.below(v.vocab_size) as u32;
            }
        }
        for i in 1..n.saturating_sub(1) {
            dec_labels[bi * l + i] = s[i] as i64;
        }
    }
    let mask_seed = rng.next_u64();
    let dense_visibility = cfg
        .reference_compat
        .then(|| reference_decoder_visibility(&seqs, l, cfg.p_dec, rng));
    Ok(RetroMaeBatch {
        enc: EncoderInput {
            ids: enc_ids,
            mask: dec.mask.clone(),
            batch: b,
            len: l,
        },
        enc_labels,
        dec,
        dec_labels,
        words,
        mask_seed,
        dense_visibility,
    })
}

/// The reference collator's decoder matrix: K = min(L, 128) token-level masks of round(L·p)
/// positions (at most 512) pre-sampled per example; each row picks one, hides itself, and sees
/// the rest; padding rows and columns are invisible. [B, Lpad, Lpad], 1 = visible.
fn reference_decoder_visibility(seqs: &[Vec<u32>], lpad: usize, p: f32, rng: &mut Rng) -> Vec<u8> {
    let mut vis = vec![0u8; seqs.len() * lpad * lpad];
    for (bi, s) in seqs.iter().enumerate() {
        let n = s.len();
        let k = n.min(128);
        let count = ((n as f64 * p as f64).round() as usize)
            .clamp(1, 512)
            .min(n);
        let masks: Vec<Vec<bool>> = (0..k)
            .map(|_| {
                let mut pos: Vec<usize> = (0..n).collect();
                rng.shuffle(&mut pos);
                let mut m = vec![false; n];
                for &i in &pos[..count] {
                    m[i] = true;
                }
                m
            })
            .collect();
        for i in 0..n {
            let m = &masks[rng.below(k)];
            for j in 0..n {
                let hidden = m[j] || j == i;
                vis[(bi * lpad + i) * lpad + j] = u8::from(!hidden);
            }
        }
    }
    vis
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> MaskingVocab {
        // ids: 0 <s>, 1 <pad>, 2 </s>, 3 <unk>, 4 <mask>; 5..=9 start words, 10..=14 continue.
        let n = 15;
        let special: Vec<bool> = (0..n).map(|i| i <= 4).collect();
        let word_start: Vec<bool> = (0..n).map(|i| i <= 9).collect();
        MaskingVocab {
            cls: 0,
            eos: 2,
            pad: 1,
            mask: 4,
            vocab_size: n,
            word_start,
            special,
        }
    }

    #[test]
    fn whole_words_are_masked_together_and_specials_never() {
        let v = vocab();
        let doc: Vec<u32> = vec![5, 10, 11, 6, 12, 7, 8, 13, 14, 9];
        let cfg = MaskingConfig {
            p_enc: 0.3,
            p_dec: 0.5,
            reference_compat: false,
        };
        for seed in 0..50 {
            let mut rng = Rng::new(seed, 0);
            let b = make_batch(&[&doc, &doc[..3]], &v, &cfg, 64, &mut rng).unwrap();
            let l = b.enc.len;
            assert_eq!(b.enc_labels[0], IGNORE);
            let masked: Vec<usize> = (0..l).filter(|&i| b.enc_labels[i] != IGNORE).collect();
            assert!(
                !masked.is_empty() && masked.len() <= 4,
                "round(12*0.3)=4: {masked:?}"
            );
            // Whole words: positions 1-3 (5,10,11) form one word, 4-5 (6,12) one, 7-9 (8,13,14).
            for word in [vec![1, 2, 3], vec![4, 5], vec![7, 8, 9]] {
                let k = word.iter().filter(|&&i| b.enc_labels[i] != IGNORE).count();
                assert!(
                    k == 0 || k == word.len(),
                    "seed {seed}: word {word:?} partially masked"
                );
            }
            assert_eq!(b.dec_labels[0], IGNORE);
            assert_eq!(b.dec_labels[11], IGNORE, "last real position");
            assert_eq!(b.dec_labels[1], 5);
            // Second example: <s> 5 10 11 </s> then padding.
            assert_eq!(&b.dec.ids[l..l + 5], &[0, 5, 10, 11, 2]);
            assert!(b.dec_labels[l + 5..2 * l].iter().all(|&x| x == IGNORE));
            assert_eq!(b.words[1], b.words[2]);
            assert_ne!(b.words[3], b.words[4]);
        }
    }

    #[test]
    fn replacement_is_80_10_10() {
        let v = vocab();
        let doc: Vec<u32> = (0..400).map(|i| 5 + (i % 5) as u32).collect();
        let cfg = MaskingConfig {
            p_enc: 0.3,
            p_dec: 0.5,
            reference_compat: false,
        };
        let (mut masked, mut as_mask, mut same) = (0, 0, 0);
        for seed in 0..20 {
            let b = make_batch(&[&doc], &v, &cfg, 512, &mut Rng::new(seed, 1)).unwrap();
            for i in 0..b.enc.len {
                if b.enc_labels[i] != IGNORE {
                    masked += 1;
                    as_mask += usize::from(b.enc.ids[i] == 4);
                    same += usize::from(b.enc.ids[i] as i64 == b.enc_labels[i]);
                }
            }
        }
        let f = as_mask as f64 / masked as f64;
        assert!((f - 0.8).abs() < 0.03, "mask fraction {f}");
        let s = same as f64 / masked as f64;
        assert!(
            s > 0.08 && s < 0.14,
            "unchanged fraction {s} (10% + random hits)"
        );
    }

    #[test]
    fn reference_compat_materialises_row_masks() {
        let v = vocab();
        let doc: Vec<u32> = vec![5, 6, 7, 8, 9, 5, 6];
        let cfg = MaskingConfig {
            p_enc: 0.3,
            p_dec: 0.5,
            reference_compat: true,
        };
        let b = make_batch(&[&doc, &doc[..2]], &v, &cfg, 64, &mut Rng::new(3, 0)).unwrap();
        let l = b.enc.len;
        let vis = b.dense_visibility.unwrap();
        for i in 0..l {
            assert_eq!(vis[i * l + i], 0, "row {i} sees itself");
            let hidden = (0..l).filter(|&j| vis[i * l + j] == 0).count();
            // round(9 * 0.5) = 4 (or 5) hidden positions, plus itself when not already hidden.
            assert!((4..=6).contains(&hidden), "row {i}: {hidden} hidden");
        }
        // Padding rows and columns of the short example are invisible.
        let off = l * l;
        assert!((0..l).all(|j| vis[off + 5 * l + j] == 0));
        assert!((0..l).all(|i| vis[off + i * l + 6] == 0));
    }
}
