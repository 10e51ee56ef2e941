//! Where a member computes, in what precision, and how it holds its weights:
//! `--device`, `--dtype` and `--weights`, parsed once ([`ComputeArgs`]) and turned
//! into a candle device in one place ([`ComputeArgs::select`]). Every role,
//! `tessera up`, `generate` and `bench` take these flags; nothing else names a device.
//!
//! The CPU is the only device for now. `cuda:N` parses (so a deployment can be
//! written ahead) and is refused at start-up with a message that says so.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};
pub use tessera_model::weights::WeightFormat;

/// A device named on the command line: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("cpu") {
            return Ok(Self::Cpu);
        }
        let ordinal = match s.split_once(':') {
            None if s.eq_ignore_ascii_case("cuda") => Some("0"),
            Some((kind, n)) if kind.eq_ignore_ascii_case("cuda") => Some(n),
            _ => None,
        };
        match ordinal.map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Self::Cuda(n)),
            _ => Err(format!(
                "unknown device {s:?}: expected `cpu`, `cuda` or `cuda:N`"
            )),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Precision of a member's weights and activations (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Precision {
    #[default]
    F32,
    F16,
    Bf16,
}

impl Precision {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

impl From<Precision> for DType {
    fn from(p: Precision) -> Self {
        p.dtype()
    }
}

/// `--device` refused: the reason names the flag and what works instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--device {device}: {reason}")]
pub struct DeviceError {
    pub device: DeviceSpec,
    pub reason: &'static str,
}

/// `--device`, `--dtype` and `--weights`, shared by every command that loads weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::Args)]
pub struct ComputeArgs {
    /// Device to run on: `cpu` (`cuda:N` is not built into this binary yet).
    #[arg(long, env = "TESSERA_DEVICE", default_value_t = DeviceSpec::Cpu)]
    pub device: DeviceSpec,
    /// Precision of the activations, norms and biases (f32 is fastest on the CPU).
    #[arg(long, env = "TESSERA_DTYPE", value_enum, default_value_t = Precision::F32)]
    pub dtype: Precision,
    /// How linear weights (every projection, the experts, the LM head; the token
    /// embeddings alike) are held in memory; products compute in f32 from them.
    /// `auto`: as the checkpoint stores them (bf16 for the released models) with
    /// `--dtype f32`, else in `--dtype`. `f32`, `bf16`, `f16`: converted at load.
    /// `int8`: quantized at load, one f32 scale per 32 weights of a row.
    /// Memory ≈ parameters × bytes per weight (4, 2, 2, 1.125).
    #[arg(long, env = "TESSERA_WEIGHTS", default_value_t = WeightFormat::Auto,
          value_parser = parse_weights)]
    pub weights: WeightFormat,
}

fn parse_weights(s: &str) -> Result<WeightFormat, String> {
    s.parse()
}

/// The device and dtype a member loads its weights onto, and how it holds them.
#[derive(Debug, Clone)]
pub struct Compute {
    pub device: Device,
    pub dtype: DType,
    pub weights: WeightFormat,
}

impl ComputeArgs {
    /// The CPU in `dtype`.
    pub fn cpu(dtype: Precision) -> Self {
        Self {
            device: DeviceSpec::Cpu,
            dtype,
            weights: WeightFormat::Auto,
        }
    }

    /// The device and dtype to load onto; a device this binary cannot use is
    /// refused here, before anything loads.
    pub fn select(&self) -> Result<Compute, DeviceError> {
        let device = match self.device {
            DeviceSpec::Cpu => Device::Cpu,
            DeviceSpec::Cuda(_) => {
                return Err(DeviceError {
                    device: self.device,
                    reason: "this build of Tessera runs on the CPU only (CUDA support is \
                             not built in yet); use --device cpu",
                });
            }
        };
        Ok(Compute {
            device,
            dtype: self.dtype.dtype(),
            weights: self.weights,
        })
    }
}

impl Compute {
    /// Where `checkpoint`'s tensors load to: this device, dtype and weight format.
    pub fn target<'a>(
        &'a self,
        checkpoint: &'a tessera_model::weights::Checkpoint,
    ) -> tessera_model::weights::LoadTarget<'a> {
        tessera_model::weights::LoadTarget::new(checkpoint, self.dtype, self.weights, &self.device)
    }

    /// The host CPU in f32: for tensors that never touch a model (decoded
    /// request payloads, files written for inspection).
    pub fn host() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            weights: WeightFormat::Auto,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        compute: ComputeArgs,
    }

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("CUDA".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().unwrap_err().contains("cuda:N"));
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn the_cpu_is_chosen_and_cuda_is_refused_clearly() {
        let cli = Cli::parse_from(["t"]);
        assert_eq!(cli.compute, ComputeArgs::default());
        let chosen = cli.compute.select().unwrap();
        assert!(chosen.device.is_cpu());
        assert_eq!(chosen.dtype, DType::F32);
        let bf16 = Cli::parse_from(["t", "--dtype", "bf16"])
            .compute
            .select()
            .unwrap();
        assert_eq!(bf16.dtype, DType::BF16);
        assert_eq!(bf16.weights, WeightFormat::Auto);
        let int8 = Cli::parse_from(["t", "--weights", "int8"]).compute;
        assert_eq!(int8.weights, WeightFormat::Int8);
        let err = Cli::try_parse_from(["t", "--weights", "q4"])
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("auto, f32, bf16, f16, int8"), "{err}");
        let cuda = Cli::parse_from(["t", "--device", "cuda:1"]).compute;
        let err = cuda.select().unwrap_err().to_string();
        assert!(
            err.starts_with("--device cuda:1:") && err.contains("--device cpu"),
            "{err}"
        );
        assert!(Cli::try_parse_from(["t", "--device", "gpu"]).is_err());
    }
}
