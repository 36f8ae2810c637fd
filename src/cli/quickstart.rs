//! `retrom3 quickstart`: tokenizer, RetroMAE pre-training, M3 fine-tuning and evaluation of a
//! small model on the bundled demo set (data/demo), with a report (library: `retrom3::quickstart`).

use clap::Args;
use retrom3::quickstart::{
    default_data_dir, run_with_settings, table, QuickstartSettings, QuickstartSize,
};
use retrom3::{Device, Result};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct QuickstartArgs {
    /// Output directory: results.json, summary.md, loss curves (SVG), the models.
    #[arg(long, default_value = "quickstart-out")]
    pub output: PathBuf,
    /// cpu, cuda[:N] (larger settings), or emu (an `emu` build, for checks: with --small).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// The CI size: a tiny model and a few steps (also RETROM3_QUICKSTART_SMALL=1).
    #[arg(long)]
    pub small: bool,
    /// The BEIR directory with pretrain.txt and train.jsonl (default: data/demo).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Override the size's RetroMAE step count (e.g. a short GPU check).
    #[arg(long)]
    pub pretrain_steps: Option<u64>,
    /// Override the size's M3 fine-tuning step count.
    #[arg(long)]
    pub finetune_steps: Option<u64>,
}

pub fn run(a: QuickstartArgs) -> Result<()> {
    let small = a.small || std::env::var("RETROM3_QUICKSTART_SMALL").is_ok_and(|v| v == "1");
    let size = if small {
        QuickstartSize::Small
    } else if matches!(a.device, Device::Cpu) {
        QuickstartSize::Full
    } else {
        QuickstartSize::Large
    };
    let data = a.data.unwrap_or_else(default_data_dir);
    let mut settings = QuickstartSettings::of(size);
    for (flag, n, to) in [
        (
            "--pretrain-steps",
            a.pretrain_steps,
            &mut settings.pretrain_steps,
        ),
        (
            "--finetune-steps",
            a.finetune_steps,
            &mut settings.finetune_steps,
        ),
    ] {
        match n {
            Some(0) => {
                return Err(retrom3::Error::invalid(format!("{flag} 0: must be >= 1")));
            }
            Some(n) => *to = n,
            None => {}
        }
    }
    // The header once the flags are known good (an error is then the only line).
    super::output::check_output_dir("--output", &a.output)?;
    eprintln!(
        "quickstart ({size:?}) on {}: data {}, output {}",
        a.device,
        data.display(),
        a.output.display()
    );
    let report = run_with_settings(settings, size, a.device, &data, &a.output, &mut |l| {
        eprintln!("  {l}")
    })?;
    outln!("{}", table(&report));
    outln!(
        "{} test queries; {:.0} s; report in {}/summary.md",
        report.bm25.queries,
        report.seconds,
        report.output.display()
    );
    Ok(())
}
