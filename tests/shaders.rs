//! Every WGSL shader parses and validates with naga, so a typo fails `cargo test`.

#[test]
fn every_shader_validates_with_naga() {
    for (name, source) in xent::gpu::shaders() {
        let source = source.as_str();
        let module = naga::front::wgsl::parse_str(source)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(source)));
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(source)));
        assert!(
            module.entry_points.len() == 1 && module.entry_points[0].name == "main",
            "{name}: one compute entry point named main"
        );
    }
}
