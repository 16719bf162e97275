//! guest-driver-patch
