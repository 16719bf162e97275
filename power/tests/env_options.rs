//! `SourceOptions::from_env`: the estimate model and wall sources from the environment, as the
//! backend and the benchmark read them. One test in its own binary: it sets process-wide
//! environment variables.

use power::SourceOptions;

#[test]
fn model_and_meter_from_the_environment_and_bad_values_rejected() {
    // This binary runs this one test: nothing else reads the environment meanwhile.
    std::env::set_var("VNB_IDLE_WATTS", "55.5");
    std::env::set_var("VNB_WATTS_PER_CORE", "7");
    std::env::set_var("VNB_METER_CMD", "echo 120");
    let o = SourceOptions::from_env().unwrap();
    assert_eq!(o.model.idle_watts, 55.5);
    assert_eq!(o.model.watts_per_busy_core, 7.0);
    assert_eq!(o.meter_command.as_deref(), Some("echo 120"));
    std::env::set_var("VNB_IDLE_WATTS", "lots");
    let e = SourceOptions::from_env().unwrap_err().to_string();
    assert!(
        e.contains("VNB_IDLE_WATTS") && e.contains("not a number"),
        "{e}"
    );
    std::env::set_var("VNB_IDLE_WATTS", "-1");
    let e = SourceOptions::from_env().unwrap_err().to_string();
    assert!(e.contains(">= 0"), "{e}");
}
