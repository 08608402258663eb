const VERSION: &str = "b";
include!("../../versioned.rs");
