//! RetroMAE's whole training step on a kernel device (`model::retromae::RetroMae::loss` and its
//! backward): the encoder, its MLM loss, the decoder's two streams, the two-stream decoder layer
//! and its loss, all on the device; the host sends the batch's ids, labels and mask seed and reads
//! back two floats.
//!
//! ```text
//! H = encoder(enc ids)                                  DeviceEncoder::forward
//! L_enc = CE(lm_head(H[masked rows]), labels)           lm_head_loss (tied word embeddings)
//! content = Dropout(embed(dec ids)); content[i, 0] = H[i, 0]
//! query   = Dropout(LN(H[i, 0] + P[pos] + T[0]))        gather + residual_layernorm
//! y = cross_layer(query, content, two-stream mask)      DeviceEncoder::cross_layer_fwd
//! L_dec = CE(lm_head(y), dec labels)
//! ```
//!
//! The backward runs the same path in reverse; every gradient reaching H (masked rows, the
//! sentence rows through both streams) is summed in one f32 buffer before the encoder's backward.
//! Dropout streams are the CPU model's: the decoder's seed is the encoder's ^
//! [`DECODER_SEED_XOR`], content stream 0, query stream 1, decoder layer 2-4.

use super::encoder::{dropout_copy, hash_drop};
use super::lm_head::{lm_head_loss, LmHeadBufs};
use super::{upload_pod, DBuf, DeviceEncoder, FlatLayout};
use crate::data::masking::{RetroMaeBatch, IGNORE};
use crate::device::kernels::{self as k, AttnKernelMask};
use crate::device::launch::{KDType, KernelDevice};
use crate::error::{Error, Result};
use crate::model::config::ModelKind;
use crate::model::encoder::{DropoutCfg, LAYER_TENSORS};
use crate::model::lm_head::LM_HEAD_TENSORS;
use crate::model::retromae::DECODER_SEED_XOR;
use crate::tensor::Tensor;
use std::sync::Arc;

/// Elements of one chunk of logits in the LM head (rows = this / vocabulary): 256 Mi, 512 MB in
/// bf16 (1,073 rows at bge-m3's 250,002 words). Each chunk reads the word embeddings twice and
/// reads and writes their f32 gradient (1 GB at bge-m3's size) once: at 64 Mi a B32 x S512 step
/// had ~80 chunks, ~200 GB of that traffic (~45 ms at 4.3 TB/s, counted, not measured); now ~20.
const LOGIT_CHUNK: usize = 1 << 28;

/// The LM head (5 tensors) and the decoder layer (16) on the device, in `RetroMae::specs` order
/// after the encoder's, as views of one flat buffer (a device optimizer updates them in one pass).
pub struct DeviceRetroMaeHeads {
    weights: Vec<DBuf>,
    flat: Arc<DBuf>,
    layout: FlatLayout,
}

impl std::fmt::Debug for DeviceRetroMaeHeads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceRetroMaeHeads({} elements, {})",
            self.layout.total,
            self.flat.dtype().suffix()
        )
    }
}

impl DeviceRetroMaeHeads {
    /// Upload the LM head and decoder tensors (`RetroMae`'s parameters after the encoder's).
    pub fn upload(dev: &dyn KernelDevice, values: &[Tensor], dt: KDType) -> Result<Self> {
        if values.len() != LM_HEAD_TENSORS + LAYER_TENSORS {
            return Err(Error::invalid(format!(
                "device RetroMAE heads: {} tensors, expected {} (LM head + decoder layer)",
                values.len(),
                LM_HEAD_TENSORS + LAYER_TENSORS
            )));
        }
        let lens: Vec<usize> = values.iter().map(Tensor::numel).collect();
        let layout = FlatLayout::new(&lens);
        let (flat, weights) = DBuf::flat(dev, &layout, dt)?;
        for (w, t) in weights.iter().zip(values) {
            w.write_f32(dev, t.to_f32().f32s()?)?;
        }
        Ok(DeviceRetroMaeHeads {
            weights,
            flat,
            layout,
        })
    }

    /// The flat buffer and its layout (for the device optimizer).
    pub fn flat(&self) -> (&DBuf, &FlatLayout) {
        (&self.flat, &self.layout)
    }

    /// The 21 tensors (LM head, then decoder layer).
    pub fn weights(&self) -> &[DBuf] {
        &self.weights
    }
}

/// The LM head's weights: `heads[..5]` and the tied word embeddings `word_emb`.
fn lm_bufs<'a>(heads: &'a [DBuf], word_emb: &'a DBuf) -> LmHeadBufs<'a> {
    LmHeadBufs {
        dense_w: &heads[0],
        dense_b: &heads[1],
        ln_g: &heads[2],
        ln_b: &heads[3],
        bias: &heads[4],
        word_emb,
    }
}

/// One micro-batch of RetroMAE on the device, forward and backward: returns (L_enc, L_dec) and
/// accumulates `g` times the gradient of L_enc + L_dec into `enc_grads` (the encoder's tensors,
/// f32, `DeviceEncoder::zero_grads` order) and `head_grads` (the heads', f32, `heads`' order).
/// The decoder's visibility is generated in the attention kernels from `batch.mask_seed`
/// (`p_dec`); a batch with a materialised mask (`reference_compat`) is refused.
#[allow(clippy::too_many_arguments)]
pub fn retromae_step(
    dev: &dyn KernelDevice,
    denc: &DeviceEncoder,
    heads: &DeviceRetroMaeHeads,
    (enc_grads, head_grads): (&[DBuf], &[DBuf]),
    batch: &RetroMaeBatch,
    p_dec: f32,
    drop: Option<DropoutCfg>,
    g: f32,
) -> Result<(f32, f32)> {
    let c = &denc.config;
    let dt = denc.dt;
    let (b, l, h) = (batch.enc.batch, batch.enc.len, c.hidden_size);
    let n = b * l;
    if batch.dense_visibility.is_some() {
        return Err(Error::Unsupported {
            op: "the RetroMAE decoder with a materialised visibility matrix (reference_compat); \
                 the device kernels generate the mask from the seed"
                .into(),
            device: dev.device().to_string(),
        });
    }
    if head_grads.len() != heads.weights.len() || enc_grads.len() != denc.weights().len() {
        return Err(Error::invalid(format!(
            "device RetroMAE step: {} encoder / {} head gradient buffers for {} / {} tensors",
            enc_grads.len(),
            head_grads.len(),
            denc.weights().len(),
            heads.weights.len()
        )));
    }
    if batch.dec.batch != b
        || batch.dec.len != l
        || batch.enc_labels.len() != n
        || batch.dec_labels.len() != n
        || batch.words.len() != n
    {
        return Err(Error::invalid(format!(
            "RetroMAE batch: encoder input {b} x {l}, decoder input {} x {}, {} / {} labels, {} \
             word indices",
            batch.dec.batch,
            batch.dec.len,
            batch.enc_labels.len(),
            batch.dec_labels.len(),
            batch.words.len()
        )));
    }
    let enc_rows: Vec<u32> = (0..n)
        .filter(|&i| batch.enc_labels[i] != IGNORE)
        .map(|i| i as u32)
        .collect();
    if enc_rows.is_empty() && batch.dec_labels.iter().all(|&t| t == IGNORE) {
        return Err(Error::invalid(
            "RetroMAE batch has nothing to predict: no encoder-masked token and no decoder \
             target (every text is shorter than 3 tokens)",
        ));
    }
    let offset = match c.kind {
        ModelKind::XlmRoberta => c.pad_token_id as usize + 1,
        ModelKind::Bert => 0,
    };
    if offset + l > c.max_position_embeddings {
        return Err(Error::invalid(format!(
            "RetroMAE decoder: positions up to {} exceed max_position_embeddings {}",
            offset + l - 1,
            c.max_position_embeddings
        )));
    }
    let ew = denc.weights();
    let (lm_w, dec_w) = heads.weights.split_at(LM_HEAD_TENSORS);
    let (lm_g, dec_g) = head_grads.split_at(LM_HEAD_TENSORS);
    let lm = lm_bufs(lm_w, &ew[0]);
    let lmg = lm_bufs(lm_g, &enc_grads[0]);
    let chunk = (LOGIT_CHUNK / c.vocab_size.max(1)).max(1);
    let eps = c.layer_norm_eps;

    // Encoder, and the f32 sum of every gradient that reaches its output.
    let f = denc.forward(dev, &batch.enc, drop, true)?;
    let hidden = &f.hidden;
    let dhid = DBuf::zeros(dev, n * h, KDType::F32)?;

    // Encoder MLM loss on the masked rows.
    let mut l_enc = 0.0;
    if !enc_rows.is_empty() {
        let m = enc_rows.len();
        let ids = upload_pod(dev, &enc_rows)?;
        let x = DBuf::uninit(dev, m * h, dt)?;
        // SAFETY: hidden holds n × h; ids are row numbers < n; x holds m × h.
        unsafe { k::gather_fwd(dev, dt, hidden.ptr(), ids.ptr, x.ptr(), m, h, n)? };
        let targets: Vec<i64> = enc_rows
            .iter()
            .map(|&r| batch.enc_labels[r as usize])
            .collect();
        let (loss, dx) = lm_head_loss(dev, &lm, &lmg, &x, &targets, g, eps, chunk)?;
        l_enc = loss;
        // SAFETY: dx m × h; dhid n × h f32; ids < n.
        unsafe { k::gather_bwd(dev, dt, dx.ptr(), ids.ptr, dhid.ptr(), m, h, n, None)? };
    }

    // Decoder streams.
    let ddrop = drop.map(|d| DropoutCfg {
        seed: d.seed ^ DECODER_SEED_XOR,
        ..d
    });
    let (content, emb) = denc.embed_fwd(dev, &batch.dec, ddrop, true)?;
    let row_bytes = h * dt.size();
    for i in 0..b {
        // SAFETY: both hold n × h elements of type dt; row i·l is inside.
        unsafe { dev.copy_d2d(hidden.at(i * l * h), content.at(i * l * h), row_bytes)? };
    }
    let bcast: Vec<u32> = (0..n).map(|r| ((r / l) * l) as u32).collect();
    let pos_ids: Vec<u32> = (0..n).map(|r| (offset + r % l) as u32).collect();
    let (bcast, pos_ids) = (upload_pod(dev, &bcast)?, upload_pod(dev, &pos_ids)?);
    let hq = DBuf::uninit(dev, n * h, dt)?;
    let posr = DBuf::uninit(dev, n * h, dt)?;
    let zq = DBuf::uninit(dev, n * h, dt)?;
    let yq = DBuf::uninit(dev, n * h, dt)?;
    let (mean_q, rstd_q) = (
        DBuf::uninit(dev, n, KDType::F32)?,
        DBuf::uninit(dev, n, KDType::F32)?,
    );
    // SAFETY: hq, posr, zq, yq hold n × h; the position table max_position × h (ids checked
    // above), the type table's row 0 and the LayerNorm parameters h; mean / rstd n f32.
    unsafe {
        k::gather_fwd(dev, dt, hidden.ptr(), bcast.ptr, hq.ptr(), n, h, n)?;
        k::gather_fwd(
            dev,
            dt,
            ew[1].ptr(),
            pos_ids.ptr,
            posr.ptr(),
            n,
            h,
            c.max_position_embeddings,
        )?;
        k::residual_layernorm_fwd(
            dev,
            dt,
            hq.ptr(),
            ew[2].ptr(),
            posr.ptr(),
            ew[3].ptr(),
            ew[4].ptr(),
            zq.ptr(),
            yq.ptr(),
            mean_q.ptr(),
            rstd_q.ptr(),
            n,
            h,
            eps,
            None,
        )?;
    }
    std::mem::drop((hq, posr));
    let qdrop = ddrop.and_then(|d| hash_drop(d.hidden, d.seed, 1));
    let query = dropout_copy(dev, &yq, qdrop)?.unwrap_or(yq);

    // The decoder layer under the two-stream mask, and its loss.
    let key_mask = upload_pod(dev, &batch.dec.mask)?;
    let words = upload_pod(dev, &batch.words)?;
    let mask = AttnKernelMask::TwoStream {
        key_mask: key_mask.ptr,
        words: words.ptr,
        p: p_dec,
        seed: batch.mask_seed,
    };
    let lf = denc.cross_layer_fwd(dev, dec_w, (&query, &content), (b, l), mask, ddrop, 2)?;
    // The LM head over the labelled rows only (not padding, nor each text's first and last).
    let dec_rows: Vec<u32> = (0..n)
        .filter(|&i| batch.dec_labels[i] != IGNORE)
        .map(|i| i as u32)
        .collect();
    let (l_dec, dy) = if dec_rows.len() == n {
        lm_head_loss(dev, &lm, &lmg, &lf.y, &batch.dec_labels, g, eps, chunk)?
    } else {
        let m = dec_rows.len();
        let ids = upload_pod(dev, &dec_rows)?;
        let x = DBuf::uninit(dev, m * h, dt)?;
        // SAFETY: y holds n × h; ids are row numbers < n; x holds m × h.
        unsafe { k::gather_fwd(dev, dt, lf.y.ptr(), ids.ptr, x.ptr(), m, h, n)? };
        let targets: Vec<i64> = dec_rows
            .iter()
            .map(|&r| batch.dec_labels[r as usize])
            .collect();
        let (loss, dx) = lm_head_loss(dev, &lm, &lmg, &x, &targets, g, eps, chunk)?;
        let dy32 = DBuf::zeros(dev, n * h, KDType::F32)?;
        let dy = DBuf::uninit(dev, n * h, dt)?;
        // SAFETY: dx m × h; dy32 n × h f32 (ids < n); dy n × h of type dt.
        unsafe {
            k::gather_bwd(dev, dt, dx.ptr(), ids.ptr, dy32.ptr(), m, h, n, None)?;
            k::cast_from_f32(dev, dt, dy32.ptr(), dy.ptr(), n * h)?;
        }
        (loss, dy)
    };

    // Backward through the decoder layer.
    let (dquery, dcontent) =
        denc.cross_layer_bwd(dev, (dec_w, dec_g), (&query, &content), lf, &dy)?;
    std::mem::drop((dy, query, content, key_mask, words));
    // Query stream: dropout, LayerNorm, then positions, token type 0 and the sentence rows.
    let dyq = dropout_copy(dev, &dquery, qdrop)?;
    let dyq = dyq.as_ref().unwrap_or(&dquery);
    let dzq = DBuf::uninit(dev, n * h, dt)?;
    // SAFETY: zq, dyq, dzq n × h; stats n; LayerNorm parameters and their f32 gradients h; the
    // position gradient table max_position × h f32 (ids in range); dhid n × h f32.
    unsafe {
        k::layernorm_bwd(
            dev,
            dt,
            zq.ptr(),
            ew[3].ptr(),
            mean_q.ptr(),
            rstd_q.ptr(),
            dyq.ptr(),
            dzq.ptr(),
            enc_grads[3].ptr(),
            enc_grads[4].ptr(),
            n,
            h,
        )?;
        k::gather_bwd(
            dev,
            dt,
            dzq.ptr(),
            pos_ids.ptr,
            enc_grads[1].ptr(),
            n,
            h,
            c.max_position_embeddings,
            None,
        )?;
        k::colsum(dev, dt, dzq.ptr(), enc_grads[2].ptr(), n, h)?;
        // Each text's query rows all came from its sentence row.
        for i in 0..b {
            k::colsum(dev, dt, dzq.at(i * l * h), dhid.at(i * l * h), l, h)?;
        }
    }
    std::mem::drop((dzq, dquery, zq, mean_q, rstd_q));
    // Content stream: the sentence rows go to H, the others into the embeddings.
    let cls: Vec<u32> = (0..b).map(|i| (i * l) as u32).collect();
    let cls = upload_pod(dev, &cls)?;
    let dcls = DBuf::uninit(dev, b * h, dt)?;
    // SAFETY: dcontent n × h, dcls b × h, dhid n × h f32; cls row numbers < n.
    unsafe {
        k::gather_fwd(dev, dt, dcontent.ptr(), cls.ptr, dcls.ptr(), b, h, n)?;
        k::gather_bwd(dev, dt, dcls.ptr(), cls.ptr, dhid.ptr(), b, h, n, None)?;
        for i in 0..b {
            dev.memset_zero(dcontent.at(i * l * h), row_bytes)?;
        }
    }
    denc.embed_bwd(dev, emb, &dcontent, enc_grads)?;
    std::mem::drop((dcontent, dcls));

    // The encoder's backward from everything that reached H.
    let dh = DBuf::uninit(dev, n * h, dt)?;
    // SAFETY: dhid n × h f32, dh n × h of type dt.
    unsafe { k::cast_from_f32(dev, dt, dhid.ptr(), dh.ptr(), n * h)? };
    std::mem::drop(dhid);
    denc.backward(dev, f, &dh, enc_grads)?;
    Ok((l_enc, l_dec))
}
