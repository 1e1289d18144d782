//! explain/ and render/ against independent implementations: pytorch-grad-cam's CAM formulas, PyTorch's and
//! OpenCV's bilinear resizing, OpenCV's colormaps and pytorch-grad-cam's deprocess_image
//! (tests/fixtures/make_explain_fixtures.py wrote the values).

use camserve::maths::{cam, maps};
use camserve::methods::{Compute, Method};
use camserve::render::{self, Colormap};
use ndarray::{Array2, Array3, Array4, ArrayD, Axis, Ix2, Ix3, Ix4};
use ndarray_npy::NpzReader;

fn npz() -> NpzReader<std::fs::File> {
    NpzReader::new(std::fs::File::open(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/explain.npz")).unwrap()).unwrap()
}

fn f32s(name: &str) -> ArrayD<f32> {
    npz().by_name(name).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn u8s(name: &str) -> ArrayD<u8> {
    npz().by_name(name).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn rel(a: &Array2<f32>, b: ndarray::ArrayView2<f32>) -> f64 {
    let d = a.iter().zip(b.iter()).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    let s = b.iter().fold(0f64, |m, &y| m.max((y as f64).abs()));
    d / s.max(1e-30)
}

#[test]
fn cam_methods_match_pytorch_grad_cam() {
    let acts: Array4<f32> = f32s("acts").into_dimensionality::<Ix4>().unwrap();
    let grads: Array4<f32> = f32s("grads").into_dimensionality::<Ix4>().unwrap();
    for (method, key) in [
        ("gradcam", "gradcam"),
        ("gradcam++", "gradcampp"),
        ("xgradcam", "xgradcam"),
        ("hirescam", "hirescam"),
        ("layercam", "layercam"),
    ] {
        // Through the registry: the name's entry must compute the formula the fixture holds.
        let method = Method::parse(method).unwrap();
        let Compute::Layer(compute) = method.compute else { panic!("{method} is a layer CAM") };
        let want: Array3<f32> = f32s(key).into_dimensionality::<Ix3>().unwrap();
        for b in 0..2 {
            let got = compute(acts.index_axis(Axis(0), b), grads.index_axis(Axis(0), b));
            let e = rel(&got, want.index_axis(Axis(0), b));
            assert!(e <= 1e-5, "{method} item {b}: {e:.2e}");
            assert!(got.iter().any(|&v| v > 0.0), "{method}: degenerate fixture");
        }
    }
}

#[test]
fn eigencam_matches_the_svd_projection() {
    let acts: Array4<f32> = f32s("acts").into_dimensionality::<Ix4>().unwrap();
    let want: Array3<f32> = f32s("eigencam").into_dimensionality::<Ix3>().unwrap();
    for b in 0..2 {
        let got = cam::eigencam(acts.index_axis(Axis(0), b));
        // SVD's sign is arbitrary; camserve makes the largest magnitude positive. Do the same to the reference.
        let w = want.index_axis(Axis(0), b);
        let extreme = w.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        let w = if extreme < 0.0 { w.mapv(|v| -v) } else { w.to_owned() };
        let e = rel(&got, w.view());
        assert!(e <= 1e-4, "eigencam item {b}: {e:.2e}");
    }
}

#[test]
fn bilinear_resize_matches_pytorch_and_opencv() {
    for case in ["up", "odd", "down"] {
        let src: Array2<f32> = f32s(&format!("resize_{case}_src")).into_dimensionality::<Ix2>().unwrap();
        let torch: Array2<f32> = f32s(&format!("resize_{case}_torch")).into_dimensionality::<Ix2>().unwrap();
        let cv: Array2<f32> = f32s(&format!("resize_{case}_cv2")).into_dimensionality::<Ix2>().unwrap();
        let (h, w) = torch.dim();
        let got = maps::resize_bilinear(src.view(), h, w);
        let max_abs = |a: &Array2<f32>, b: &Array2<f32>| a.iter().zip(b.iter()).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(max_abs(&got, &torch) <= 1e-5, "{case}: vs PyTorch {}", max_abs(&got, &torch));
        assert!(max_abs(&got, &cv) <= 1e-5, "{case}: vs OpenCV {}", max_abs(&got, &cv));
    }
}

#[test]
fn display_map_matches_scale_cam_image() {
    let cams: Array3<f32> = f32s("gradcam").into_dimensionality::<Ix3>().unwrap();
    let want: Array3<f32> = f32s("scaled_gradcam").into_dimensionality::<Ix3>().unwrap();
    for b in 0..2 {
        let got = maps::display_map(&cams.index_axis(Axis(0), b).to_owned(), 64, 64);
        let d = got.iter().zip(want.index_axis(Axis(0), b).iter()).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(d <= 1e-5, "item {b}: {d}");
    }
}

#[test]
fn colormaps_match_opencv() {
    let mask: Array2<f32> = f32s("mask").into_dimensionality::<Ix2>().unwrap();
    for (cm, key) in [(Colormap::Jet, "jet_heatmap"), (Colormap::Turbo, "turbo_heatmap")] {
        let want = u8s(key);
        let got = render::colorize(&mask, cm);
        assert_eq!(got.as_raw().as_slice(), want.as_slice().unwrap(), "{key}");
    }
}

#[test]
fn gradient_images_match_deprocess_image() {
    let grad: Array3<f32> = f32s("input_grad").into_dimensionality::<Ix3>().unwrap();
    let want = u8s("deprocessed");
    let got = render::rgb_from_unit(&maps::deprocess(grad.view()));
    let diff = got.as_raw().iter().zip(want.iter()).map(|(&a, &b)| (a as i32 - b as i32).abs()).max().unwrap();
    // float32 (numpy) vs float64 (camserve) standardisation can differ by one level at truncation edges
    assert!(diff <= 1, "deprocess differs by {diff} levels");
}
