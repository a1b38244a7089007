//! Saved training state in safetensors: parameters under their PyTorch names (so a
//! checkpoint is also a loadable `state_dict`), optimizer buffers as `optimizer.<buffer>`, and
//! the position in training plus the configuration as metadata. The same bytes serve the
//! per-epoch checkpoints and the state a joining worker fetches. The final `model.safetensors`
//! holds the parameters alone, with one metadata entry naming the network ([`ModelInfo`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::codec::{self, TensorSpec};
use crate::config::ModelConfig;
use crate::optim::OptimizerState;

/// Where in the schedule a state was taken: after `step` steps of epoch `epoch` (a finished
/// epoch `e` is stored as `epoch = e + 1, step = 0`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    /// Epoch the next step belongs to.
    pub epoch: u64,
    /// Steps of that epoch already applied.
    pub step: u64,
}

/// Everything a replica needs to continue training.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingState {
    /// Flat parameters.
    pub params: Vec<f32>,
    /// Optimizer state.
    pub optimizer: OptimizerState,
    /// Position in the schedule.
    pub position: Position,
}

/// What a checkpoint carries besides the training state: the coordinator's account of the
/// epoch in progress, so a resumed job reports the same epoch metrics as an uninterrupted one.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Extras {
    /// The epoch's statistics so far, as JSON (the coordinator's format).
    pub progress: Option<String>,
    /// How many times each training sample was applied so far in the epoch.
    pub coverage: Option<Vec<u8>>,
}

/// Name of the coverage tensor in a checkpoint.
const COVERAGE: &str = "lockstep.coverage";

/// A named `F32` tensor: its little-endian bytes (the values' own memory on a little-endian
/// machine) and its shape.
type F32Tensor<'a> = (String, Cow<'a, [u8]>, Vec<usize>);

/// The tensors of `params` in `layout`, under their names.
fn param_tensors<'a>(layout: &[TensorSpec], params: &'a [f32]) -> Vec<F32Tensor<'a>> {
    layout
        .iter()
        .map(|s| {
            let bytes = codec::le_bytes(&params[s.range()]);
            (s.name.clone(), bytes, s.shape.clone())
        })
        .collect()
}

/// Safetensors views of `tensors`.
fn f32_views<'a>(
    tensors: &'a [F32Tensor<'_>],
) -> Result<Vec<(String, TensorView<'a>)>, safetensors::SafeTensorError> {
    tensors
        .iter()
        .map(|(n, b, shape)| Ok((n.clone(), TensorView::new(Dtype::F32, shape.clone(), b)?)))
        .collect()
}

/// The metadata key of [`ModelInfo`] in `model.safetensors`.
pub const MODEL_INFO_KEY: &str = "lockstep";

/// What `model.safetensors` says about the network it holds, as JSON under the metadata key
/// [`MODEL_INFO_KEY`]: enough to rebuild the network and its input transform without the run's
/// `config.toml`. Not the whole configuration: two runs that reach the same parameters (other
/// worker counts, other run directories) write the same bytes, and a single entry keeps them so
/// (safetensors writes a metadata map in no fixed order).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The network.
    pub model: ModelConfig,
    /// Whether inputs were standardised with MNIST's mean and deviation.
    pub normalize: bool,
}

/// What a safetensors file says about the model in it.
#[derive(Clone, Debug, PartialEq)]
pub enum StoredModel {
    /// A checkpoint: the run's whole configuration (TOML) and where in training it was taken.
    Checkpoint {
        /// The configuration saved with it.
        config_toml: String,
        /// Its position in the schedule.
        position: Position,
    },
    /// A final `model.safetensors` that names its network.
    Model(ModelInfo),
    /// Neither: a `model.safetensors` from before [`ModelInfo`], or another program's file.
    Unknown,
}

/// Reads what the safetensors file `bytes` says about its model (its header only).
pub fn stored_model(bytes: &[u8]) -> Result<StoredModel> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .context("not a safetensors file (its header does not parse)")?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) == Some("lockstep-checkpoint-v1") {
        let num = |k: &str| -> Result<u64> {
            meta.get(k)
                .ok_or_else(|| anyhow!("checkpoint metadata lacks `{k}`"))?
                .parse()
                .with_context(|| format!("checkpoint metadata `{k}`"))
        };
        return Ok(StoredModel::Checkpoint {
            config_toml: meta.get("config").cloned().unwrap_or_default(),
            position: Position {
                epoch: num("epoch")?,
                step: num("step")?,
            },
        });
    }
    match meta.get(MODEL_INFO_KEY) {
        Some(json) => Ok(StoredModel::Model(
            serde_json::from_str(json).with_context(|| {
                format!("metadata `{MODEL_INFO_KEY}` does not describe a model")
            })?,
        )),
        None => Ok(StoredModel::Unknown),
    }
}

/// Serialises parameters alone under their PyTorch names (`model.safetensors`), with `info`.
pub fn params_to_bytes(layout: &[TensorSpec], params: &[f32], info: &ModelInfo) -> Result<Vec<u8>> {
    let data = param_tensors(layout, params);
    let views = f32_views(&data)?;
    let meta = HashMap::from([(MODEL_INFO_KEY.to_string(), serde_json::to_string(info)?)]);
    Ok(safetensors::serialize(views, Some(meta))?)
}

/// The parameters of `layout` from a checkpoint or a model file (other tensors are ignored).
/// Every tensor is checked against its name, type and shape before anything is allocated, so
/// a file for another network is refused with the tensor that differs.
pub fn params_from_bytes(layout: &[TensorSpec], bytes: &[u8]) -> Result<Vec<f32>> {
    let tensors = safetensors::SafeTensors::deserialize(bytes).context("reading the tensors")?;
    read_params(&tensors, layout)
}

/// One `F32` tensor of `shape`, or an error naming it.
fn read_f32(tensors: &safetensors::SafeTensors, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    Ok(codec::le_f32s(check_f32(tensors, name, shape)?.data())?)
}

fn check_f32<'a>(
    tensors: &'a safetensors::SafeTensors,
    name: &str,
    shape: &[usize],
) -> Result<TensorView<'a>> {
    let t = tensors
        .tensor(name)
        .map_err(|_| anyhow!("it has no tensor `{name}`"))?;
    if t.dtype() != Dtype::F32 || t.shape() != shape {
        bail!(
            "tensor `{name}` is {:?} {:?}, the model needs F32 {shape:?}",
            t.dtype(),
            t.shape()
        );
    }
    Ok(t)
}

/// The flat parameters of `layout`, every tensor checked before the buffer is allocated.
fn read_params(tensors: &safetensors::SafeTensors, layout: &[TensorSpec]) -> Result<Vec<f32>> {
    for s in layout {
        check_f32(tensors, &s.name, &s.shape)?;
    }
    let mut params = vec![0.0; codec::layout_len(layout)];
    for s in layout {
        let t = check_f32(tensors, &s.name, &s.shape)?;
        codec::le_f32s_into(t.data(), &mut params[s.range()])?;
    }
    Ok(params)
}

impl TrainingState {
    /// Serialises the state with its configuration as metadata.
    pub fn to_bytes(&self, layout: &[TensorSpec], config_toml: &str) -> Result<Vec<u8>> {
        self.to_bytes_with(layout, config_toml, &Extras::default())
    }

    /// Serialises the state with its configuration and `extras`.
    pub fn to_bytes_with(
        &self,
        layout: &[TensorSpec],
        config_toml: &str,
        extras: &Extras,
    ) -> Result<Vec<u8>> {
        let mut data = param_tensors(layout, &self.params);
        for (name, buf) in &self.optimizer.buffers {
            let bytes = codec::le_bytes(buf);
            data.push((format!("optimizer.{name}"), bytes, vec![buf.len()]));
        }
        let mut views = f32_views(&data)?;
        if let Some(coverage) = &extras.coverage {
            views.push((
                COVERAGE.to_string(),
                TensorView::new(Dtype::U8, vec![coverage.len()], coverage)?,
            ));
        }
        let mut meta = HashMap::new();
        if let Some(progress) = &extras.progress {
            meta.insert("progress".to_string(), progress.clone());
        }
        meta.insert("format".to_string(), "lockstep-checkpoint-v1".to_string());
        meta.insert("epoch".to_string(), self.position.epoch.to_string());
        meta.insert("step".to_string(), self.position.step.to_string());
        meta.insert(
            "optimizer_step".to_string(),
            self.optimizer.step.to_string(),
        );
        meta.insert(
            "optimizer_buffers".to_string(),
            self.optimizer
                .buffers
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(","),
        );
        meta.insert("config".to_string(), config_toml.to_string());
        Ok(safetensors::serialize(views, Some(meta))?)
    }

    /// Parses a state, checking every tensor against `layout`. Returns the state and the
    /// configuration stored with it.
    pub fn from_bytes(layout: &[TensorSpec], bytes: &[u8]) -> Result<(Self, String)> {
        let (state, config, _) = Self::from_bytes_with(layout, bytes)?;
        Ok((state, config))
    }

    /// Like [`TrainingState::from_bytes`], also returning the checkpoint's [`Extras`].
    pub fn from_bytes_with(layout: &[TensorSpec], bytes: &[u8]) -> Result<(Self, String, Extras)> {
        let (_, header) =
            safetensors::SafeTensors::read_metadata(bytes).context("reading the state header")?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some("lockstep-checkpoint-v1") {
            bail!("not a Lockstep checkpoint (format metadata missing)");
        }
        let tensors =
            safetensors::SafeTensors::deserialize(bytes).context("reading the state tensors")?;
        let num = |k: &str| -> Result<u64> {
            meta.get(k)
                .ok_or_else(|| anyhow!("checkpoint metadata lacks `{k}`"))?
                .parse()
                .with_context(|| format!("checkpoint metadata `{k}`"))
        };
        let len = codec::layout_len(layout);
        let params = read_params(&tensors, layout)?;
        let mut buffers = Vec::new();
        let mut named = std::collections::HashSet::new();
        for name in meta
            .get("optimizer_buffers")
            .map(String::as_str)
            .unwrap_or("")
            .split(',')
        {
            if name.is_empty() {
                continue;
            }
            // Each name is read into a buffer of its own: a name repeated would let a small
            // file make the reader allocate the same tensor over and over.
            if !named.insert(name) {
                bail!("checkpoint metadata `optimizer_buffers` names `{name}` more than once");
            }
            buffers.push((
                name.to_string(),
                read_f32(&tensors, &format!("optimizer.{name}"), &[len])?,
            ));
        }
        let state = TrainingState {
            params,
            optimizer: OptimizerState {
                step: num("optimizer_step")?,
                buffers,
            },
            position: Position {
                epoch: num("epoch")?,
                step: num("step")?,
            },
        };
        let coverage = match tensors.tensor(COVERAGE) {
            Ok(t) if t.dtype() == Dtype::U8 && t.shape().len() == 1 => Some(t.data().to_vec()),
            Ok(_) => bail!("checkpoint tensor `{COVERAGE}` is not a U8 vector"),
            Err(_) => None,
        };
        let extras = Extras {
            progress: meta.get("progress").cloned(),
            coverage,
        };
        Ok((
            state,
            meta.get("config").cloned().unwrap_or_default(),
            extras,
        ))
    }

    /// Writes the state atomically (temporary file, then rename): a crash mid-write never
    /// leaves a torn checkpoint behind.
    pub fn save(&self, path: &Path, layout: &[TensorSpec], config_toml: &str) -> Result<()> {
        write_atomic(path, &self.to_bytes(layout, config_toml)?)
    }
}

/// Writes `bytes` to `path` through a temporary file, flushed to disk, and a rename: a process
/// killed at any moment leaves either the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(file);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::pack_layout;

    #[test]
    fn state_round_trips_and_wrong_layouts_are_refused() {
        let layout = pack_layout(&[("fc.weight", vec![2, 3]), ("fc.bias", vec![2])]);
        let state = TrainingState {
            params: (0..8).map(|i| i as f32 * 0.5).collect(),
            optimizer: OptimizerState {
                step: 7,
                buffers: vec![
                    ("exp_avg".into(), vec![1.0; 8]),
                    ("exp_avg_sq".into(), vec![2.0; 8]),
                ],
            },
            position: Position { epoch: 2, step: 0 },
        };
        let bytes = state.to_bytes(&layout, "seed = 1").unwrap();
        let (back, cfg) = TrainingState::from_bytes(&layout, &bytes).unwrap();
        assert_eq!(back, state);
        assert_eq!(cfg, "seed = 1");
        let other = pack_layout(&[("fc.weight", vec![3, 2]), ("fc.bias", vec![2])]);
        let err = TrainingState::from_bytes(&other, &bytes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("fc.weight"), "{err}");
        assert!(TrainingState::from_bytes(&layout, &bytes[..bytes.len() - 3]).is_err());
    }

    /// Two parameters, SGD's state after 3 steps, taken at step 5 of epoch 2.
    fn two_params_at_epoch_2_step_5() -> TrainingState {
        TrainingState {
            params: vec![1.0, 2.0],
            optimizer: OptimizerState {
                step: 3,
                buffers: vec![],
            },
            position: Position { epoch: 1, step: 5 },
        }
    }

    #[test]
    fn extras_round_trip_and_are_optional() {
        let layout = pack_layout(&[("fc.bias", vec![2])]);
        let state = two_params_at_epoch_2_step_5();
        let extras = Extras {
            progress: Some("{\"samples\":320}".into()),
            coverage: Some(vec![0, 1, 1, 0]),
        };
        let bytes = state.to_bytes_with(&layout, "", &extras).unwrap();
        let (back, _, got) = TrainingState::from_bytes_with(&layout, &bytes).unwrap();
        assert_eq!((back, got), (state.clone(), extras));
        let plain = state.to_bytes(&layout, "").unwrap();
        let (_, _, got) = TrainingState::from_bytes_with(&layout, &plain).unwrap();
        assert_eq!(got, Extras::default());
    }

    #[test]
    fn model_file_holds_only_named_parameters_and_names_its_network() {
        let layout = pack_layout(&[("fc.weight", vec![2, 3]), ("fc.bias", vec![2])]);
        let info = ModelInfo {
            model: ModelConfig::parse_spec("linear").unwrap(),
            normalize: true,
        };
        let params: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let bytes = params_to_bytes(&layout, &params, &info).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names = st.names();
        names.sort();
        assert_eq!(names, ["fc.bias", "fc.weight"]);
        assert_eq!(st.tensor("fc.weight").unwrap().shape(), &[2, 3]);
        assert_eq!(
            stored_model(&bytes).unwrap(),
            StoredModel::Model(info.clone())
        );
        assert_eq!(params_from_bytes(&layout, &bytes).unwrap(), params);
        // The same parameters, the same bytes (one metadata entry: no map order to vary).
        assert_eq!(bytes, params_to_bytes(&layout, &params, &info).unwrap());
    }

    #[test]
    fn a_file_for_another_network_is_refused_with_the_tensor_that_differs() {
        let layout = pack_layout(&[("fc.weight", vec![2, 3]), ("fc.bias", vec![2])]);
        let info = ModelInfo {
            model: ModelConfig::parse_spec("linear").unwrap(),
            normalize: false,
        };
        let bytes = params_to_bytes(&layout, &[0.0; 8], &info).unwrap();
        let wider = pack_layout(&[("fc.weight", vec![4, 3]), ("fc.bias", vec![4])]);
        let err = params_from_bytes(&wider, &bytes).unwrap_err().to_string();
        assert!(
            err.contains("`fc.weight` is F32 [2, 3], the model needs F32 [4, 3]"),
            "{err}"
        );
        let deeper = pack_layout(&[("fc1.weight", vec![2, 3])]);
        let err = params_from_bytes(&deeper, &bytes).unwrap_err().to_string();
        assert!(err.contains("no tensor `fc1.weight`"), "{err}");
        assert!(stored_model(b"not a safetensors file").is_err());
    }

    #[test]
    fn a_checkpoint_says_where_it_was_taken_and_its_configuration() {
        let layout = pack_layout(&[("fc.bias", vec![2])]);
        let state = two_params_at_epoch_2_step_5();
        let bytes = state.to_bytes(&layout, "seed = 1").unwrap();
        assert_eq!(
            stored_model(&bytes).unwrap(),
            StoredModel::Checkpoint {
                config_toml: "seed = 1".into(),
                position: Position { epoch: 1, step: 5 }
            }
        );
        assert_eq!(params_from_bytes(&layout, &bytes).unwrap(), [1.0, 2.0]);
        let bare = safetensors::serialize(
            [(
                "fc.bias",
                TensorView::new(Dtype::F32, vec![2], &[0u8; 8]).unwrap(),
            )],
            None,
        )
        .unwrap();
        assert_eq!(stored_model(&bare).unwrap(), StoredModel::Unknown);
    }
}

#[cfg(test)]
mod props;
