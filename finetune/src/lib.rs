//! Downstream tasks on pretrained backbones.
