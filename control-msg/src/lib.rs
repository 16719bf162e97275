//! control-msg
