"""compactfusion's benchmark scripts (run each as ``python benchmarks/<name>.py``; see its
docstring). Shared helpers: ``benchmarks._report`` (CSV, machine stamp, PSNR/SSIM) and
``benchmarks.netns`` (two network namespaces joined by a rate-limited veth pair)."""
