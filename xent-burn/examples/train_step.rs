//! A burn training step whose loss is xent's: the one changed line is marked. Run with
//! `cargo run --release -p xent-burn --example train_step` (a Vulkan, Metal or DX12
//! adapter, or lavapipe).

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Distribution, Int, Tensor};

#[derive(Module, Debug)]
struct Classifier {
    hidden: Linear,
    out: Linear,
    act: Relu,
}

impl Classifier {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.out.forward(self.act.forward(self.hidden.forward(x)))
    }
}

fn main() {
    // burn's wgpu runtime, with xent on the same device and queue.
    let device = xent_burn::init_wgpu(Default::default()).expect("a wgpu adapter").autodiff();
    let (batch, features, classes) = (256, 64, 1000);
    let mut model = Classifier {
        hidden: LinearConfig::new(features, 256).init(&device),
        out: LinearConfig::new(256, classes).init(&device),
        act: Relu::new(),
    };
    let mut optim = SgdConfig::new().init();
    let x = Tensor::<2>::random([batch, features], Distribution::Default, &device);
    let y = Tensor::<1, Int>::random([batch], Distribution::Uniform(0.0, classes as f64), &device);
    // burn's: let loss_fn = burn::nn::loss::CrossEntropyLossConfig::new().init(&device);
    let loss_fn = xent_burn::CrossEntropyLossConfig::new().with_label_smoothing(0.1).init(&device); // the changed line
    for step in 0..20 {
        let loss = loss_fn.forward(model.forward(x.clone()), y.clone());
        if step % 5 == 0 {
            println!("step {step}: loss {}", loss.clone().into_scalar::<f32>());
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(0.1, model, grads);
    }
}
