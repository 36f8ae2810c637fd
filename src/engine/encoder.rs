//! The BERT / XLM-RoBERTa encoder on a kernel device, forward and backward.
//!
//! Per layer (post-LN, as `model::encoder::bert_layer`), with N = B·L rows:
//!
//! ```text
//! q, k, v = x Wq/k/vᵀ (GEMM) + b (add_bias)
//! ctx     = attention(q, k, v)                     fused flash-style kernel, lse saved
//! z1      = Dropout(ctx Woᵀ + bo) + x;  x1 = LN(z1)   GEMM + residual_layernorm
//! u       = x1 W1ᵀ;  g = gelu(u + b1)              GEMM + bias_gelu
//! z2      = Dropout(g W2ᵀ + b2) + x1;  y = LN(z2)    GEMM + residual_layernorm
//! ```
//!
//! Training saves x, q, k, v, ctx, lse, z1, x1, u, g, z2 and the LayerNorm statistics per layer;
//! inference keeps nothing but the running hidden state. Parameter gradients are f32 buffers,
//! accumulated (`+=`): GEMMs with beta = 1, colsum / LayerNorm / scatter kernels with atomics.
//! Storage is f32 or bf16 (`dt`); bf16 GEMMs accumulate in f32 (cuBLAS compute 32F).

use super::{upload_pod, DBuf};
use crate::autograd::{Grads, Tape, Var};
use crate::device::cpu::attention::{AttnDims, AttnDropout};
use crate::device::cpu::gemm::Trans;
use crate::device::kernels::{self as k, AttnKernelMask, HashDropout};
use crate::device::launch::{DevBuf, DevPtr, DeviceGemm, KDType, KernelDevice};
use crate::error::{Error, Result};
use crate::model::config::EncoderConfig;
use crate::model::config::ModelKind;
use crate::model::encoder::{DropoutCfg, Encoder, EncoderInput, EMBEDDING_TENSORS, LAYER_TENSORS};
use crate::tensor::Tensor;

/// An encoder's weights on a device, in `encoder_param_specs` order.
pub struct DeviceEncoder {
    pub config: EncoderConfig,
    pub dt: KDType,
    /// Views of `flat` (one buffer in `layout`): a device optimizer updates them in one pass.
    weights: Vec<DBuf>,
    flat: Option<std::sync::Arc<DBuf>>,
    layout: super::FlatLayout,
}

impl std::fmt::Debug for DeviceEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceEncoder({} layers, hidden {}, {})",
            self.config.num_hidden_layers,
            self.config.hidden_size,
            self.dt.suffix()
        )
    }
}

/// Activations of one layer kept for the backward.
struct LayerActs {
    q: DBuf,
    k: DBuf,
    v: DBuf,
    ctx: DBuf,
    lse: DBuf,
    z1: DBuf,
    mean1: DBuf,
    rstd1: DBuf,
    x1: DBuf,
    u: DBuf,
    g: DBuf,
    z2: DBuf,
    mean2: DBuf,
    rstd2: DBuf,
}

/// A training forward of one two-input layer ([`DeviceEncoder::cross_layer_fwd`]).
pub struct LayerForward {
    /// [batch · len, hidden] output.
    pub y: DBuf,
    acts: LayerActs,
    d: Dims,
    mask: AttnKernelMask,
    drop: Option<DropoutCfg>,
    stream: u64,
}

/// What the embeddings block of a training forward saved ([`DeviceEncoder::embed_fwd`]): the
/// ids and positions, the LayerNorm input and statistics, the dropout.
pub struct EmbedForward {
    ids: DevBuf,
    pos: DevBuf,
    z0: DBuf,
    mean0: DBuf,
    rstd0: DBuf,
    d: Dims,
    drop: Option<DropoutCfg>,
}

/// What a training forward saved.
struct Saved {
    emb: EmbedForward,
    /// Input of each layer (xs[0] is the embeddings' output).
    xs: Vec<DBuf>,
    layers: Vec<LayerActs>,
}

/// The result of a forward: the last hidden state and, for training, the saved activations.
pub struct EncoderForward {
    /// [B·L, hidden] last hidden state.
    pub hidden: DBuf,
    pub batch: usize,
    pub len: usize,
    key_mask: Option<DevBuf>,
    drop: Option<DropoutCfg>,
    saved: Option<Saved>,
}

/// Sizes of one forward.
#[derive(Clone, Copy)]
struct Dims {
    rows: usize,
    batch: usize,
    len: usize,
    h: usize,
    f: usize,
    heads: usize,
}

impl Dims {
    fn attn(&self) -> AttnDims {
        AttnDims {
            batch: self.batch,
            q_len: self.len,
            k_len: self.len,
            heads: self.heads,
            head_dim: self.h / self.heads,
        }
    }
}

/// y [rows, out] = x [rows, in] Wᵀ (W [out, in]).
pub(crate) fn linear(
    dev: &dyn KernelDevice,
    x: &DBuf,
    w: &DBuf,
    rows: usize,
    inp: usize,
    out: usize,
) -> Result<DBuf> {
    let y = DBuf::uninit(dev, rows * out, x.dtype())?;
    let g = DeviceGemm {
        ta: Trans::N,
        tb: Trans::T,
        m: rows,
        k: inp,
        n: out,
        alpha: 1.0,
        beta: 0.0,
        ab: x.dtype(),
        c: x.dtype(),
    };
    // SAFETY: x holds rows·in, w out·in and y rows·out elements (checked by construction).
    unsafe { dev.gemm(&g, x.ptr(), w.ptr(), y.ptr())? };
    Ok(y)
}

/// Backward of [`linear`]: dx = beta·dx + dy W (when `dx` is given) and dW += dyᵀ x (f32).
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_bwd(
    dev: &dyn KernelDevice,
    x: &DBuf,
    w: &DBuf,
    dy: &DBuf,
    dx: Option<(&DBuf, f32)>,
    dw: &DBuf,
    rows: usize,
    inp: usize,
    out: usize,
) -> Result<()> {
    let dt = x.dtype();
    if let Some((dx, beta)) = dx {
        let g = DeviceGemm {
            ta: Trans::N,
            tb: Trans::N,
            m: rows,
            k: out,
            n: inp,
            alpha: 1.0,
            beta,
            ab: dt,
            c: dt,
        };
        // SAFETY: dy rows·out, w out·in, dx rows·in.
        unsafe { dev.gemm(&g, dy.ptr(), w.ptr(), dx.ptr())? };
    }
    let g = DeviceGemm {
        ta: Trans::T,
        tb: Trans::N,
        m: out,
        k: rows,
        n: inp,
        alpha: 1.0,
        beta: 1.0,
        ab: dt,
        c: KDType::F32,
    };
    // SAFETY: dy rows·out (read transposed), x rows·in, dw out·in f32.
    unsafe { dev.gemm(&g, dy.ptr(), x.ptr(), dw.ptr()) }
}

pub(crate) fn hash_drop(p: f32, seed: u64, stream: u64) -> Option<HashDropout> {
    (p > 0.0).then_some(HashDropout { p, seed, stream })
}

/// The element-wise dropout of the backward (same mask), or `None` when there is none.
pub(crate) fn dropout_copy(
    dev: &dyn KernelDevice,
    x: &DBuf,
    d: Option<HashDropout>,
) -> Result<Option<DBuf>> {
    let Some(d) = d else { return Ok(None) };
    let y = DBuf::uninit(dev, x.len(), x.dtype())?;
    // SAFETY: x and y hold len elements.
    unsafe { k::dropout_fwd(dev, x.dtype(), x.ptr(), y.ptr(), x.len(), d)? };
    Ok(Some(y))
}

impl DeviceEncoder {
    /// Upload `enc`'s weights as `dt`. The fused attention kernels take head dims 32, 64 and 128.
    pub fn upload(dev: &dyn KernelDevice, enc: &Encoder, dt: KDType) -> Result<DeviceEncoder> {
        let c = &enc.config;
        let hd = c.head_dim();
        if !matches!(hd, 32 | 64 | 128) {
            return Err(Error::Unsupported {
                op: format!(
                    "the device encoder with head dim {hd} ({} / {} heads; the fused attention \
                     kernels take 32, 64, 128)",
                    c.hidden_size, c.num_attention_heads
                ),
                device: dev.device().to_string(),
            });
        }
        let mut d = DeviceEncoder {
            config: c.clone(),
            dt,
            weights: Vec::new(),
            flat: None,
            layout: super::FlatLayout::new(&[]),
        };
        d.set_weights(dev, enc.params.values())?;
        Ok(d)
    }

    /// Replace the weights (after an optimizer step on the host, or from another copy).
    pub fn set_weights(&mut self, dev: &dyn KernelDevice, values: &[Tensor]) -> Result<()> {
        let want = EMBEDDING_TENSORS + LAYER_TENSORS * self.config.num_hidden_layers;
        if values.len() != want {
            return Err(Error::invalid(format!(
                "device encoder: {} weight tensors, expected {want}",
                values.len()
            )));
        }
        let same_shapes = self.weights.len() == values.len()
            && self
                .weights
                .iter()
                .zip(values)
                .all(|(w, t)| w.len() == t.numel());
        if same_shapes {
            // Every optimizer step: copy into the existing buffers, no reallocation.
            for (w, t) in self.weights.iter().zip(values) {
                w.write_f32(dev, t.to_f32().f32s()?)?;
            }
        } else {
            let lens: Vec<usize> = values.iter().map(Tensor::numel).collect();
            self.layout = super::FlatLayout::new(&lens);
            let (flat, views) = DBuf::flat(dev, &self.layout, self.dt)?;
            for (w, t) in views.iter().zip(values) {
                w.write_f32(dev, t.to_f32().f32s()?)?;
            }
            self.flat = Some(flat);
            self.weights = views;
        }
        Ok(())
    }

    /// The weights as one flat buffer and its layout (every weight is a view of it).
    pub fn flat_weights(&self) -> Option<(&DBuf, &super::FlatLayout)> {
        self.flat.as_deref().map(|f| (f, &self.layout))
    }

    /// f32 zero gradient buffers, one per weight, as views of one flat buffer in the weights'
    /// layout (returned too: a device optimizer reads it in one pass).
    pub fn zero_grads_flat(
        &self,
        dev: &dyn KernelDevice,
    ) -> Result<(std::sync::Arc<DBuf>, Vec<DBuf>)> {
        DBuf::flat(dev, &self.layout, KDType::F32)
    }

    /// f32 zero gradient buffers, one per weight (same order).
    pub fn zero_grads(&self, dev: &dyn KernelDevice) -> Result<Vec<DBuf>> {
        Ok(self.zero_grads_flat(dev)?.1)
    }

    /// Set every gradient buffer to zero (the start of an optimizer step: buffers are reused,
    /// not reallocated).
    pub fn clear_grads(dev: &dyn KernelDevice, grads: &[DBuf]) -> Result<()> {
        grads.iter().try_for_each(|g| g.zero(dev))
    }

    /// A training forward whose last hidden state [B, L, hidden] is copied to the host and put on
    /// `tape` as a leaf: the trainers compute their heads and losses on the host from it.
    pub fn forward_leaf(
        &self,
        dev: &dyn KernelDevice,
        tape: &mut Tape,
        input: &EncoderInput,
        drop: Option<DropoutCfg>,
    ) -> Result<(EncoderForward, Var)> {
        let f = self.forward(dev, input, drop, true)?;
        let h = Tensor::from_vec(
            f.hidden.to_f32(dev)?,
            &[input.batch, input.len, self.config.hidden_size],
        )?;
        Ok((f, tape.leaf(h)))
    }

    /// The backward of [`DeviceEncoder::forward_leaf`]: uploads the gradient `g` holds for `leaf`
    /// (zero when none reached it) and accumulates the weight gradients into `grads`.
    pub fn backward_leaf(
        &self,
        dev: &dyn KernelDevice,
        fwd: EncoderForward,
        leaf: &Var,
        g: &mut Grads,
        grads: &[DBuf],
    ) -> Result<()> {
        let dh = g
            .take(leaf)
            .unwrap_or_else(|| Tensor::zeros(leaf.dims()))
            .to_f32();
        let dhd = DBuf::from_f32(dev, dh.f32s()?, self.dt)?;
        self.backward(dev, fwd, &dhd, grads)
    }

    /// The weights (for tests and the heads).
    pub fn weights(&self) -> &[DBuf] {
        &self.weights
    }

    fn dims(&self, input: &EncoderInput) -> Dims {
        self.dims_of(input.batch, input.len)
    }

    fn dims_of(&self, batch: usize, len: usize) -> Dims {
        Dims {
            rows: batch * len,
            batch,
            len,
            h: self.config.hidden_size,
            f: self.config.intermediate_size,
            heads: self.config.num_attention_heads,
        }
    }

    /// A training forward of one BERT layer with this encoder's sizes and weights `w` (16
    /// tensors, `model::encoder::layer_param_specs` order, this encoder's storage type) whose
    /// queries and residual come from `x` and keys and values from `xkv` (both [batch · len,
    /// hidden]): the RetroMAE decoder's layer (`model::encoder::bert_layer` with its two
    /// streams). `mask`'s buffers must outlive the backward.
    #[allow(clippy::too_many_arguments)]
    pub fn cross_layer_fwd(
        &self,
        dev: &dyn KernelDevice,
        w: &[DBuf],
        (x, xkv): (&DBuf, &DBuf),
        (batch, len): (usize, usize),
        mask: AttnKernelMask,
        drop: Option<DropoutCfg>,
        stream: u64,
    ) -> Result<LayerForward> {
        let d = self.dims_of(batch, len);
        if w.len() != LAYER_TENSORS || x.len() != d.rows * d.h || xkv.len() != x.len() {
            return Err(Error::invalid(format!(
                "device layer: {} weight tensors (expected {LAYER_TENSORS}), inputs of {} and {} \
                 elements (expected {} x {})",
                w.len(),
                x.len(),
                xkv.len(),
                d.rows,
                d.h
            )));
        }
        let (y, acts) = self.layer_fwd(dev, w, (x, xkv), &d, mask, drop, stream, true)?;
        Ok(LayerForward {
            y,
            acts,
            d,
            mask,
            drop,
            stream,
        })
    }

    /// The backward of [`DeviceEncoder::cross_layer_fwd`]: from dy, the gradients of `x` and
    /// `xkv` (returned) and of the weights (accumulated into `gw`, f32).
    pub fn cross_layer_bwd(
        &self,
        dev: &dyn KernelDevice,
        (w, gw): (&[DBuf], &[DBuf]),
        (x, xkv): (&DBuf, &DBuf),
        fwd: LayerForward,
        dy: &DBuf,
    ) -> Result<(DBuf, DBuf)> {
        if gw.len() != LAYER_TENSORS || dy.len() != fwd.y.len() {
            return Err(Error::invalid(format!(
                "device layer backward: {} gradient tensors (expected {LAYER_TENSORS}), dy of {} \
                 elements (expected {})",
                gw.len(),
                dy.len(),
                fwd.y.len()
            )));
        }
        let LayerForward {
            acts,
            d,
            mask,
            drop,
            stream,
            ..
        } = fwd;
        let (dx, dxkv) =
            self.layer_bwd(dev, w, gw, (x, Some(xkv)), acts, dy, &d, mask, drop, stream)?;
        let dxkv = dxkv.ok_or_else(|| Error::invalid("device layer backward: no dxkv"))?;
        Ok((dx, dxkv))
    }

    /// Forward. `train` keeps the activations for [`DeviceEncoder::backward`]; `drop` applies
    /// the same dropout masks as the CPU encoder with the same seed (streams: embeddings 0,
    /// layer i attention 1 + 4i, attention output 2 + 4i, FFN output 3 + 4i).
    pub fn forward(
        &self,
        dev: &dyn KernelDevice,
        input: &EncoderInput,
        drop: Option<DropoutCfg>,
        train: bool,
    ) -> Result<EncoderForward> {
        crate::model::encoder::check_input(&self.config, input)?;
        let d = self.dims(input);
        let dt = self.dt;
        let c = &self.config;
        let w = &self.weights;
        if d.rows == 0 {
            return Ok(EncoderForward {
                hidden: DBuf::zeros(dev, 0, dt)?,
                batch: input.batch,
                len: input.len,
                key_mask: None,
                drop,
                saved: None,
            });
        }
        let key_mask = if input.mask.iter().all(|&m| m != 0) {
            None
        } else {
            Some(upload_pod(dev, &input.mask)?)
        };
        let (mut x, emb) = self.embed_fwd(dev, input, drop, train)?;
        let mut xs = Vec::new();
        let mut layers = Vec::new();
        let mask = match &key_mask {
            Some(m) => AttnKernelMask::KeyPadding { key_mask: m.ptr },
            None => AttnKernelMask::KeyPadding {
                key_mask: DevPtr::NULL,
            },
        };
        for i in 0..c.num_hidden_layers {
            let lw = &w[EMBEDDING_TENSORS + i * LAYER_TENSORS..][..LAYER_TENSORS];
            let stream = 1 + 4 * i as u64;
            let (y, acts) = self.layer_fwd(dev, lw, (&x, &x), &d, mask, drop, stream, train)?;
            if train {
                xs.push(x);
                layers.push(acts);
            }
            x = y;
        }
        let saved = train.then_some(Saved { emb, xs, layers });
        Ok(EncoderForward {
            hidden: x,
            batch: input.batch,
            len: input.len,
            key_mask,
            drop,
            saved,
        })
    }

    /// The embeddings block LN(word\[ids\] + pos\[pos_ids\] + type\[0\]) with dropout (stream 0 of
    /// `drop`), as the CPU `Encoder::embed`: [B·L, hidden] and, for the backward
    /// ([`DeviceEncoder::embed_bwd`]), what it saved (None unless `train`).
    pub fn embed_fwd(
        &self,
        dev: &dyn KernelDevice,
        input: &EncoderInput,
        drop: Option<DropoutCfg>,
        train: bool,
    ) -> Result<(DBuf, EmbedForward)> {
        crate::model::encoder::check_input(&self.config, input)?;
        let d = self.dims(input);
        let dt = self.dt;
        let c = &self.config;
        let w = &self.weights;
        let ids = upload_pod(dev, &input.ids)?;
        let pos = upload_pod(
            dev,
            &crate::model::encoder::position_ids(&self.config, input),
        )?;
        // Embeddings: z0 = word[ids] + type[0] + pos[pos_ids]; e = LN(z0); x0 = Dropout(e).
        let word = DBuf::uninit(dev, d.rows * d.h, dt)?;
        let posr = DBuf::uninit(dev, d.rows * d.h, dt)?;
        let z0 = if train {
            DBuf::uninit(dev, d.rows * d.h, dt)?
        } else {
            DBuf::zeros(dev, 0, dt)?
        };
        let stats = |n: usize| DBuf::uninit(dev, if train { n } else { 0 }, KDType::F32);
        let (mean0, rstd0) = (stats(d.rows)?, stats(d.rows)?);
        let e = DBuf::uninit(dev, d.rows * d.h, dt)?;
        let opt = |b: &DBuf| if b.is_empty() { DevPtr::NULL } else { b.ptr() };
        // SAFETY: every buffer was sized above for rows × hidden (or rows) elements; the tables
        // hold vocab / max_position × hidden, the ids and positions are in range (checked).
        unsafe {
            k::gather_fwd(
                dev,
                dt,
                w[0].ptr(),
                ids.ptr,
                word.ptr(),
                d.rows,
                d.h,
                c.vocab_size,
            )?;
            k::gather_fwd(
                dev,
                dt,
                w[1].ptr(),
                pos.ptr,
                posr.ptr(),
                d.rows,
                d.h,
                c.max_position_embeddings,
            )?;
            k::residual_layernorm_fwd(
                dev,
                dt,
                word.ptr(),
                w[2].ptr(),
                posr.ptr(),
                w[3].ptr(),
                w[4].ptr(),
                opt(&z0),
                e.ptr(),
                opt(&mean0),
                opt(&rstd0),
                d.rows,
                d.h,
                c.layer_norm_eps,
                None,
            )?;
        }
        drop_bufs([word, posr]);
        let x = match drop {
            Some(dc) => dropout_copy(dev, &e, hash_drop(dc.hidden, dc.seed, 0))?.unwrap_or(e),
            None => e,
        };
        Ok((
            x,
            EmbedForward {
                ids,
                pos,
                z0,
                mean0,
                rstd0,
                d,
                drop,
            },
        ))
    }

    #[allow(clippy::too_many_arguments)]
    /// One BERT layer: queries and the residual from `x`, keys and values from `xkv` (the
    /// same tensor in the encoder; the RetroMAE decoder's content stream). Dropout streams
    /// `stream` (attention), `stream + 1`, `stream + 2` (`model::encoder::bert_layer`'s).
    #[allow(clippy::too_many_arguments)]
    fn layer_fwd(
        &self,
        dev: &dyn KernelDevice,
        w: &[DBuf],
        (x, xkv): (&DBuf, &DBuf),
        d: &Dims,
        mask: AttnKernelMask,
        drop: Option<DropoutCfg>,
        stream: u64,
        train: bool,
    ) -> Result<(DBuf, LayerActs)> {
        let dt = self.dt;
        let eps = self.config.layer_norm_eps;
        let (n, h, f) = (d.rows, d.h, d.f);
        let q = linear(dev, x, &w[0], n, h, h)?;
        let kk = linear(dev, xkv, &w[2], n, h, h)?;
        let v = linear(dev, xkv, &w[4], n, h, h)?;
        let ctx = DBuf::uninit(dev, n * h, dt)?;
        let lse = DBuf::uninit(dev, d.batch * d.heads * d.len, KDType::F32)?;
        let attn_drop = drop.and_then(|dc| {
            (dc.attention > 0.0).then_some(AttnDropout {
                p: dc.attention,
                seed: dc.seed,
                stream,
            })
        });
        let hd = d.attn().head_dim;
        let scale = 1.0 / (hd as f32).sqrt();
        let keep = |len: usize, dt: KDType| DBuf::uninit(dev, if train { len } else { 0 }, dt);
        let opt = |b: &DBuf| if b.is_empty() { DevPtr::NULL } else { b.ptr() };
        // SAFETY: q, k, v, ctx hold n × h elements, lse B × H × L f32, biases h.
        unsafe {
            k::add_bias(dev, dt, q.ptr(), w[1].ptr(), n, h)?;
            k::add_bias(dev, dt, kk.ptr(), w[3].ptr(), n, h)?;
            k::add_bias(dev, dt, v.ptr(), w[5].ptr(), n, h)?;
            k::attention_fwd(
                dev,
                dt,
                q.ptr(),
                kk.ptr(),
                v.ptr(),
                ctx.ptr(),
                lse.ptr(),
                mask,
                &d.attn(),
                scale,
                attn_drop,
            )?;
        }
        let a = linear(dev, &ctx, &w[6], n, h, h)?;
        let (z1, mean1, rstd1) = (
            keep(n * h, dt)?,
            keep(n, KDType::F32)?,
            keep(n, KDType::F32)?,
        );
        let x1 = DBuf::uninit(dev, n * h, dt)?;
        let hdrop = |s: u64| drop.and_then(|dc| hash_drop(dc.hidden, dc.seed, s));
        // SAFETY: a, x, z1, x1 hold n × h; bias / gamma / beta h; mean1 / rstd1 n (or NULL).
        unsafe {
            k::residual_layernorm_fwd(
                dev,
                dt,
                a.ptr(),
                w[7].ptr(),
                x.ptr(),
                w[8].ptr(),
                w[9].ptr(),
                opt(&z1),
                x1.ptr(),
                opt(&mean1),
                opt(&rstd1),
                n,
                h,
                eps,
                hdrop(stream + 1),
            )?;
        }
        std::mem::drop(a);
        let u = linear(dev, &x1, &w[10], n, h, f)?;
        let g = DBuf::uninit(dev, n * f, dt)?;
        // SAFETY: u, g hold n × f; the bias f.
        unsafe { k::bias_gelu_fwd(dev, dt, u.ptr(), w[11].ptr(), g.ptr(), n, f)? };
        let o = linear(dev, &g, &w[12], n, f, h)?;
        let (z2, mean2, rstd2) = (
            keep(n * h, dt)?,
            keep(n, KDType::F32)?,
            keep(n, KDType::F32)?,
        );
        let y = DBuf::uninit(dev, n * h, dt)?;
        // SAFETY: as for the first residual LayerNorm.
        unsafe {
            k::residual_layernorm_fwd(
                dev,
                dt,
                o.ptr(),
                w[13].ptr(),
                x1.ptr(),
                w[14].ptr(),
                w[15].ptr(),
                opt(&z2),
                y.ptr(),
                opt(&mean2),
                opt(&rstd2),
                n,
                h,
                eps,
                hdrop(stream + 2),
            )?;
        }
        Ok((
            y,
            LayerActs {
                q,
                k: kk,
                v,
                ctx,
                lse,
                z1,
                mean1,
                rstd1,
                x1,
                u,
                g,
                z2,
                mean2,
                rstd2,
            },
        ))
    }

    /// Backward of a training forward: from d(last hidden state) [B·L, hidden] (storage `dt`),
    /// accumulate (`+=`) every weight's gradient into `grads` (f32, [`DeviceEncoder::zero_grads`]
    /// order). Consumes the saved activations.
    pub fn backward(
        &self,
        dev: &dyn KernelDevice,
        fwd: EncoderForward,
        dhidden: &DBuf,
        grads: &[DBuf],
    ) -> Result<()> {
        let EncoderForward {
            batch,
            len,
            key_mask,
            drop,
            saved,
            ..
        } = fwd;
        let saved = saved.ok_or_else(|| {
            Error::invalid("device encoder backward needs a forward run with train = true")
        })?;
        if grads.len() != self.weights.len() {
            return Err(Error::invalid(format!(
                "device encoder backward: {} gradient buffers, expected {}",
                grads.len(),
                self.weights.len()
            )));
        }
        let d = Dims {
            rows: batch * len,
            batch,
            len,
            h: self.config.hidden_size,
            f: self.config.intermediate_size,
            heads: self.config.num_attention_heads,
        };
        if dhidden.len() != d.rows * d.h || dhidden.dtype() != self.dt {
            return Err(Error::shape(
                "device encoder d(hidden)",
                &[d.rows, d.h],
                &[dhidden.len()],
            ));
        }
        let mask = AttnKernelMask::KeyPadding {
            key_mask: key_mask.as_ref().map_or(DevPtr::NULL, |m| m.ptr),
        };
        let Saved { emb, xs, layers } = saved;
        // The gradient flowing into the current layer's output; the first one is the caller's.
        let mut dy: Option<DBuf> = None;
        for (i, (x, acts)) in xs.iter().zip(layers).enumerate().rev() {
            let at = EMBEDDING_TENSORS + i * LAYER_TENSORS;
            let lw = &self.weights[at..at + LAYER_TENSORS];
            let lg = &grads[at..at + LAYER_TENSORS];
            let g_in = dy.as_ref().unwrap_or(dhidden);
            let stream = 1 + 4 * i as u64;
            let (dx, _) =
                self.layer_bwd(dev, lw, lg, (x, None), acts, g_in, &d, mask, drop, stream)?;
            dy = Some(dx);
        }
        let dx0 = dy.as_ref().unwrap_or(dhidden);
        self.embed_bwd(dev, emb, dx0, grads)
    }

    /// The backward of [`DeviceEncoder::embed_fwd`]: from d(output) `dx0` [rows, hidden],
    /// accumulate the gradients of the five embedding tensors into `grads[..5]` (f32).
    pub fn embed_bwd(
        &self,
        dev: &dyn KernelDevice,
        emb: EmbedForward,
        dx0: &DBuf,
        grads: &[DBuf],
    ) -> Result<()> {
        let EmbedForward {
            ids,
            pos,
            z0,
            mean0,
            rstd0,
            d,
            drop,
        } = emb;
        if grads.len() < EMBEDDING_TENSORS || dx0.len() != d.rows * d.h || dx0.dtype() != self.dt {
            return Err(Error::shape(
                "device embeddings d(output)",
                &[d.rows, d.h],
                &[dx0.len()],
            ));
        }
        let dt = self.dt;
        let c = &self.config;
        let de = dropout_copy(
            dev,
            dx0,
            drop.and_then(|dc| hash_drop(dc.hidden, dc.seed, 0)),
        )?;
        let de = de.as_ref().unwrap_or(dx0);
        let dz0 = DBuf::uninit(dev, d.rows * d.h, dt)?;
        let pad = Some(c.pad_token_id);
        let pos_pad = (c.kind == ModelKind::XlmRoberta).then_some(c.pad_token_id);
        let w = &self.weights;
        // SAFETY: z0, de, dz0 hold rows × hidden; the stats rows; the gradient tables have the
        // weights' sizes (f32); ids and positions are in range (checked by the forward).
        unsafe {
            k::layernorm_bwd(
                dev,
                dt,
                z0.ptr(),
                w[3].ptr(),
                mean0.ptr(),
                rstd0.ptr(),
                de.ptr(),
                dz0.ptr(),
                grads[3].ptr(),
                grads[4].ptr(),
                d.rows,
                d.h,
            )?;
            k::gather_bwd(
                dev,
                dt,
                dz0.ptr(),
                ids.ptr,
                grads[0].ptr(),
                d.rows,
                d.h,
                c.vocab_size,
                pad,
            )?;
            k::gather_bwd(
                dev,
                dt,
                dz0.ptr(),
                pos.ptr,
                grads[1].ptr(),
                d.rows,
                d.h,
                c.max_position_embeddings,
                pos_pad,
            )?;
            // Every token uses token type 0: its row gets the column sums.
            k::colsum(dev, dt, dz0.ptr(), grads[2].ptr(), d.rows, d.h)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    /// The backward of [`DeviceEncoder::layer_fwd`]: returns d`x` and, when `xkv` is a separate
    /// tensor (Some), d`xkv`; with None the keys and values came from `x` and their gradient is
    /// added to d`x`.
    #[allow(clippy::too_many_arguments)]
    fn layer_bwd(
        &self,
        dev: &dyn KernelDevice,
        w: &[DBuf],
        gw: &[DBuf],
        (x, xkv): (&DBuf, Option<&DBuf>),
        a: LayerActs,
        dy: &DBuf,
        d: &Dims,
        mask: AttnKernelMask,
        drop: Option<DropoutCfg>,
        stream: u64,
    ) -> Result<(DBuf, Option<DBuf>)> {
        let dt = self.dt;
        let (n, h, f) = (d.rows, d.h, d.f);
        let hdrop = |s: u64| drop.and_then(|dc| hash_drop(dc.hidden, dc.seed, s));
        // y = LN2(z2): dz2; z2 = Dropout(g W2ᵀ + b2) + x1.
        let dz2 = DBuf::uninit(dev, n * h, dt)?;
        // SAFETY: z2, dy, dz2 n × h; gamma h; stats n; dgamma, dbeta h f32.
        unsafe {
            k::layernorm_bwd(
                dev,
                dt,
                a.z2.ptr(),
                w[14].ptr(),
                a.mean2.ptr(),
                a.rstd2.ptr(),
                dy.ptr(),
                dz2.ptr(),
                gw[14].ptr(),
                gw[15].ptr(),
                n,
                h,
            )?;
        }
        let dpre2 = dropout_copy(dev, &dz2, hdrop(stream + 2))?;
        let dpre2 = dpre2.as_ref().unwrap_or(&dz2);
        // SAFETY: dpre2 n × h; db2 h f32.
        unsafe { k::colsum(dev, dt, dpre2.ptr(), gw[13].ptr(), n, h)? };
        let dg = DBuf::uninit(dev, n * f, dt)?;
        linear_bwd(dev, &a.g, &w[12], dpre2, Some((&dg, 0.0)), &gw[12], n, f, h)?;
        std::mem::drop(a.g);
        let du = DBuf::uninit(dev, n * f, dt)?;
        // SAFETY: u, dg, du n × f; b1 f; db1 f f32.
        unsafe {
            k::bias_gelu_bwd(
                dev,
                dt,
                a.u.ptr(),
                w[11].ptr(),
                dg.ptr(),
                du.ptr(),
                gw[11].ptr(),
                n,
                f,
            )?;
        }
        std::mem::drop(dg);
        // dx1 = dz2 (residual) + du W1, accumulated in dz2's buffer (dpre2 is no longer read).
        linear_bwd(dev, &a.x1, &w[10], &du, Some((&dz2, 1.0)), &gw[10], n, h, f)?;
        std::mem::drop(du);
        let dz1 = DBuf::uninit(dev, n * h, dt)?;
        // SAFETY: as for LN2.
        unsafe {
            k::layernorm_bwd(
                dev,
                dt,
                a.z1.ptr(),
                w[8].ptr(),
                a.mean1.ptr(),
                a.rstd1.ptr(),
                dz2.ptr(),
                dz1.ptr(),
                gw[8].ptr(),
                gw[9].ptr(),
                n,
                h,
            )?;
        }
        std::mem::drop(dz2);
        let dpre1 = dropout_copy(dev, &dz1, hdrop(stream + 1))?;
        let dpre1 = dpre1.as_ref().unwrap_or(&dz1);
        // SAFETY: dpre1 n × h; dbo h f32.
        unsafe { k::colsum(dev, dt, dpre1.ptr(), gw[7].ptr(), n, h)? };
        let dctx = DBuf::uninit(dev, n * h, dt)?;
        linear_bwd(
            dev,
            &a.ctx,
            &w[6],
            dpre1,
            Some((&dctx, 0.0)),
            &gw[6],
            n,
            h,
            h,
        )?;
        let (dq, dk, dv) = (
            DBuf::uninit(dev, n * h, dt)?,
            DBuf::uninit(dev, n * h, dt)?,
            DBuf::uninit(dev, n * h, dt)?,
        );
        let attn_drop = drop.and_then(|dc| {
            (dc.attention > 0.0).then_some(AttnDropout {
                p: dc.attention,
                seed: dc.seed,
                stream,
            })
        });
        let scale = 1.0 / (d.attn().head_dim as f32).sqrt();
        // SAFETY: q, k, v, ctx, dctx, dq, dk, dv n × h; lse B × H × L f32.
        unsafe {
            k::attention_bwd(
                dev,
                dt,
                a.q.ptr(),
                a.k.ptr(),
                a.v.ptr(),
                a.ctx.ptr(),
                a.lse.ptr(),
                dctx.ptr(),
                dq.ptr(),
                dk.ptr(),
                dv.ptr(),
                mask,
                &d.attn(),
                scale,
                attn_drop,
            )?;
        }
        std::mem::drop(dctx);
        // dx = dz1 (residual) + dq Wq (+ dk Wk + dv Wv when the keys and values came from x),
        // accumulated in dz1's buffer; otherwise dxkv = dk Wk + dv Wv.
        let dxkv = match xkv {
            Some(_) => Some(DBuf::uninit(dev, n * h, dt)?),
            None => None,
        };
        for (j, dproj) in [(0, &dq), (2, &dk), (4, &dv)] {
            let (input, out, beta) = match (j, xkv, &dxkv) {
                (0, _, _) | (_, None, _) => (x, &dz1, 1.0),
                (_, Some(xkv), Some(dxkv)) => (xkv, dxkv, if j == 2 { 0.0 } else { 1.0 }),
                _ => unreachable!("dxkv exists exactly when xkv does"),
            };
            linear_bwd(dev, input, &w[j], dproj, Some((out, beta)), &gw[j], n, h, h)?;
            // SAFETY: dproj n × h; the bias gradient h f32.
            unsafe { k::colsum(dev, dt, dproj.ptr(), gw[j + 1].ptr(), n, h)? };
        }
        Ok((dz1, dxkv))
    }
}

fn drop_bufs<const N: usize>(bufs: [DBuf; N]) {
    std::mem::drop(bufs);
}
