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
    /// Destination directory (created; must not be the source, nor a non-empty directory).
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
    // A fresh directory only: writing over another model's files would leave the ones this
    // model does not have (heads, a pytorch_model.bin, tokenizer files) to be loaded with it.
    match std::fs::read_dir(&a.output).map(|mut d| d.next().is_some()) {
        Ok(true) => {
            return Err(Error::invalid(format!(
                "--output {}: the directory exists and is not empty (convert writes a fresh \
                 model directory: remove it or choose another)",
                a.output.display()
            )));
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            if a.output.exists() && !a.output.is_dir() {
                return Err(Error::invalid(format!(
                    "--output {}: a file, not a directory",
                    a.output.display()
                )));
            }
            return Err(Error::io(&a.output, e));
        }
        _ => {}
    }
    let model = M3Model::load(&a.model, Device::Cpu)?;
    // Built in a temporary directory and renamed: a failure part way leaves no half-written
    // model. A new output is built beside it; an existing empty one (a mount point, a link to a
    // directory, `.`) is kept and filled from a temporary directory inside it.
    if a.output.exists() {
        retrom3::train::replace_files(&a.output, &[], |tmp| model.save(tmp))?;
    } else {
        retrom3::train::atomic_dir(&a.output, |tmp| model.save(tmp))?;
    }
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
