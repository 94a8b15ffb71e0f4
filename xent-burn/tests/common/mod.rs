//! What the xent-burn tests share: the option sets they walk and reading a tensor back.

use burn::tensor::Tensor;
use xent::LossOptions;

/// Every class-index option alone, `ignore_index` a class, and `all` of them (class
/// weights with z-loss: the two `mean` denominators).
pub fn option_sets(v: usize) -> Vec<(&'static str, LossOptions)> {
    let w: Vec<f32> = (0..v).map(|c| 0.5 + (c % 4) as f32 * 0.3).collect();
    vec![
        ("plain", LossOptions::new()),
        ("smoothing", LossOptions::new().label_smoothing(0.1)),
        ("weights", LossOptions::new().weights(w.clone())),
        ("z-loss", LossOptions::new().z_loss(1e-3)),
        ("softcap", LossOptions::new().softcap(3.0)),
        ("scale", LossOptions::new().logit_scale(0.7)),
        ("n_items", LossOptions::new().n_items(37.0)),
        ("ignore 2", LossOptions::new().ignore_index(2)),
        (
            "all",
            LossOptions::new().weights(w).label_smoothing(0.1).z_loss(1e-3).softcap(5.0).logit_scale(1.2),
        ),
    ]
}

/// A tensor's values as f32, row major.
pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}
