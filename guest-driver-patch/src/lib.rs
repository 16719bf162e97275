//! What runs inside the guest: the static `vnb-guest` control tool (and later the Linux
//! virtio_net patch). Placeholder: the tool is built with the batching issue, on the
//! `control-msg` codec; until then this crate has nothing to test.
