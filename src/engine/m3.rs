//! BGE-M3 inference on a kernel device: the encoder forward plus the three heads, with only the
//! head outputs coming back to the host (dense vectors, per-token sparse weights, ColBERT vectors).

use super::{open, DBuf, DeviceEncoder, Gpu};
use crate::device::cpu::gemm::Trans;
use crate::device::cpu::sparse::max_by_token_id;
use crate::device::kernels as k;
use crate::device::launch::{DeviceGemm, KDType, KernelDevice};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::io::model_dir::M3Heads;
use crate::model::config::Pooling;
use crate::model::encoder::{Encoder, EncoderInput};
use crate::model::m3::{HeadOutputs, HeadRequest, NORM_EPS};

/// An M3 model's weights on a device and the device itself.
pub struct M3Engine {
    dev: std::sync::Arc<Gpu>,
    pub encoder: DeviceEncoder,
    heads: Option<DeviceHeads>,
}

/// The ColBERT and sparse heads on a device.
pub struct DeviceHeads {
    colbert_w: DBuf,
    colbert_b: DBuf,
    colbert_dim: usize,
    sparse_w: DBuf,
    sparse_b: f32,
}

impl std::fmt::Debug for M3Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "M3Engine({} on {})",
            self.encoder.dt.suffix(),
            self.dev.device()
        )
    }
}

impl DeviceHeads {
    /// Upload the heads as `dt`.
    pub fn upload(dev: &dyn KernelDevice, h: &M3Heads, dt: KDType) -> Result<DeviceHeads> {
        Ok(DeviceHeads {
            colbert_w: DBuf::from_f32(dev, h.colbert_weight.to_f32().f32s()?, dt)?,
            colbert_b: DBuf::from_f32(dev, h.colbert_bias.to_f32().f32s()?, dt)?,
            colbert_dim: h.colbert_weight.dims()[0],
            sparse_w: DBuf::from_f32(dev, h.sparse_weight.to_f32().f32s()?, dt)?,
            sparse_b: h
                .sparse_bias
                .to_f32()
                .f32s()?
                .first()
                .copied()
                .unwrap_or(0.0),
        })
    }
}

impl M3Engine {
    /// Open `device` and upload the encoder and heads as `dt`.
    pub fn new(
        device: Device,
        encoder: &Encoder,
        heads: Option<&M3Heads>,
        dt: KDType,
    ) -> Result<M3Engine> {
        let dev: std::sync::Arc<Gpu> = open(device)?.into();
        let enc = DeviceEncoder::upload(&*dev, encoder, dt)?;
        let heads = heads
            .map(|h| DeviceHeads::upload(&*dev, h, dt))
            .transpose()?;
        Ok(M3Engine {
            dev,
            encoder: enc,
            heads,
        })
    }

    /// The device.
    pub fn device(&self) -> &Gpu {
        &*self.dev
    }

    /// A shared handle to the device (e.g. for [`crate::retrieval::Index::attach_device`]).
    pub fn device_arc(&self) -> std::sync::Arc<Gpu> {
        self.dev.clone()
    }

    /// The last hidden state [B, L, hidden] on the host (f32).
    pub fn hidden(&self, input: &EncoderInput) -> Result<Vec<f32>> {
        let fwd = self.encoder.forward(&*self.dev, input, None, false)?;
        fwd.hidden.to_f32(&*self.dev)
    }

    /// Encoder forward and the requested heads (`model::m3::heads_on_hidden` semantics).
    pub fn heads(
        &self,
        input: &EncoderInput,
        req: HeadRequest,
        special_ids: &[u32],
    ) -> Result<HeadOutputs> {
        encode_heads(
            &*self.dev,
            &self.encoder,
            self.heads.as_ref(),
            input,
            req,
            special_ids,
        )
    }
}

/// Encoder forward and the requested heads on `dev` (`model::m3::heads_on_hidden` semantics).
pub fn encode_heads(
    dev: &dyn KernelDevice,
    encoder: &DeviceEncoder,
    heads: Option<&DeviceHeads>,
    input: &EncoderInput,
    req: HeadRequest,
    special_ids: &[u32],
) -> Result<HeadOutputs> {
    let dt = encoder.dt;
    let (b, l) = (input.batch, input.len);
    let h = encoder.config.hidden_size;
    let n = b * l;
    let fwd = encoder.forward(dev, input, None, false)?;
    let hs = &fwd.hidden;
    let lens: Vec<usize> = input
        .mask
        .chunks(l.max(1))
        .map(|m| m.iter().filter(|&&x| x != 0).count())
        .collect();
    let mut out = HeadOutputs::default();
    if n == 0 {
        return Ok(out);
    }
    if req.dense {
        let pooled = match req.pooling {
            Pooling::Cls => {
                let rows: Vec<u32> = (0..b).map(|i| (i * l) as u32).collect();
                super::m3_heads::gather_rows(dev, hs, &rows, h)?
            }
            Pooling::Mean => {
                // Mean over the real tokens, on the host from the downloaded state.
                let all = hs.to_f32(dev)?;
                let mut v = vec![0.0f32; b * h];
                for bi in 0..b {
                    let cnt = lens[bi].max(1) as f32;
                    for li in 0..l {
                        if input.mask[bi * l + li] != 0 {
                            let row = &all[(bi * l + li) * h..][..h];
                            v[bi * h..][..h]
                                .iter_mut()
                                .zip(row)
                                .for_each(|(o, x)| *o += x);
                        }
                    }
                    v[bi * h..][..h].iter_mut().for_each(|o| *o /= cnt);
                }
                DBuf::from_f32(dev, &v, dt)?
            }
        };
        let pooled = if req.normalize {
            let y = DBuf::uninit(dev, b * h, dt)?;
            // SAFETY: pooled and y hold b × h.
            unsafe { k::l2_normalize_fwd(dev, dt, pooled.ptr(), y.ptr(), b, h, NORM_EPS)? };
            y
        } else {
            pooled
        };
        out.dense = pooled.to_f32(dev)?.chunks(h).map(<[f32]>::to_vec).collect();
    }
    if req.sparse || req.colbert {
        let heads = heads.ok_or_else(|| {
            Error::invalid(
                "the model has no colbert_linear.pt / sparse_linear.pt heads for the \
                 requested outputs",
            )
        })?;
        if req.sparse {
            let s = DBuf::uninit(dev, n, dt)?;
            let g = DeviceGemm {
                ta: Trans::N,
                tb: Trans::T,
                m: n,
                k: h,
                n: 1,
                alpha: 1.0,
                beta: 0.0,
                ab: dt,
                c: dt,
            };
            // SAFETY: hs n × h, the weight 1 × h, s n.
            unsafe { dev.gemm(&g, hs.ptr(), heads.sparse_w.ptr(), s.ptr())? };
            let ws: Vec<f32> = s
                .to_f32(dev)?
                .into_iter()
                .map(|x| crate::device::cpu::elementwise::relu(x + heads.sparse_b))
                .collect();
            for bi in 0..b {
                let ids = &input.ids[bi * l..(bi + 1) * l];
                out.sparse
                    .push(max_by_token_id(&ws[bi * l..(bi + 1) * l], ids, special_ids));
            }
        }
        if req.colbert {
            let dc = heads.colbert_dim;
            let (_, cn) = super::m3_heads::colbert_project(
                dev,
                dt,
                hs,
                &heads.colbert_w,
                &heads.colbert_b,
                n,
                h,
                dc,
            )?;
            let cs = cn.to_f32(dev)?;
            for (bi, &len) in lens.iter().enumerate() {
                // Every real token after CLS (right padding: positions 1..len).
                out.colbert.push(
                    (1..len)
                        .map(|li| cs[(bi * l + li) * dc..][..dc].to_vec())
                        .collect(),
                );
            }
        }
    }
    Ok(out)
}
