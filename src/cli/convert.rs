//! `retrom3 convert`: rewrite a model directory in retrom3's output layout (model.safetensors +
//! config.json + f32 .pt heads + tokenizer files), e.g. BAAI/bge-m3's pytorch_model.bin and fp16
//! heads into safetensors. The result loads in transformers and FlagEmbedding unchanged.

use clap::Args;
use retrom3::{Device, Error, M3Model, Result};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Source model directory (safetensors or pytorch_model.bin).
    #[arg(long)]
    pub model: PathBuf,
    /// Destination directory (created; must not be the source).
    #[arg(long)]
    pub output: PathBuf,
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    let same = match (a.model.canonicalize(), a.output.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    };
    if same {
        return Err(Error::invalid("--output must differ from --model"));
    }
    let model = M3Model::load(&a.model, Device::Cpu)?;
    model.save(&a.output)?;
    eprintln!(
        "wrote {} ({} parameters{})",
        a.output.display(),
        model.encoder.params.numel(),
        if model.heads.is_some() {
            ", with M3 heads"
        } else {
            ""
        }
    );
    Ok(())
}
