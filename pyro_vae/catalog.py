"""Every built-in choice, by name: what it is (the CLI's help) and where it lives.

Each registry is declared here, in a module that imports nothing heavy, so that the
configuration's validation and the CLI's choices and help read names and descriptions
without importing torch; each entry's builder is imported when it is first looked up
(:meth:`pyro_vae.registry.Registry.declare`). The modules that define the members use
these same registries (``pyro_vae.models.MODELS`` is :data:`MODELS`), so a family of
one's own still registers there with the decorator.

Adding a built-in family: its class or function in its module, and one line here.
"""

from .registry import Registry

MODELS = Registry("model")
MODELS.declare("vae", "pyro_vae.models.vae:vae_from_config",
               "the VAE: z ~ N(0, I), x | z ~ the likelihood, q(z|x) a diagonal Gaussian")
MODELS.declare("ae", "pyro_vae.models.ae:autoencoder_from_config",
               "autoencoder baseline: the VAE's networks, a point-mass guide, no KL term")
MODELS.declare("vae-iaf", "pyro_vae.models.iaf:iaf_vae_from_config",
               "the VAE with a flow guide: a Gaussian through --flow-steps inverse autoregressive transforms "
               "conditioned on the encoder (Kingma et al. 2016)")
MODELS.declare("vae2", "pyro_vae.models.vae2:two_layer_vae_from_config",
               "two stochastic layers (Burda et al. 2016): z2 ~ N(0, I) -> z1 (--z-dim) -> x; --z2-dim and "
               "--z2-hidden-dims set the upper layer")
MODELS.declare("cvae", "pyro_vae.models.cvae:conditional_vae_from_config",
               "quadrant completion, the conditional VAE of Sohn et al. 2015 (Pyro's CVAE tutorial): the "
               "--quadrants shown, z ~ p(z | shown), hidden pixels ~ the likelihood(g(z)), q(z | shown, hidden); "
               "--baseline RUN feeds a cvae-baseline's guess to the prior")
MODELS.declare("cvae-baseline", "pyro_vae.models.cvae:completion_baseline_from_config",
               "quadrant completion's deterministic baseline network: hidden pixels ~ the likelihood(f(shown)), no "
               "latent (its ELBO is log p(hidden | shown) exactly)")
MODELS.declare("m2", "pyro_vae.models.m2:m2_from_config",
               "semi-supervised M2 (Kingma et al. 2014, Pyro's SS-VAE tutorial): y ~ Cat(1/10), z ~ N(0, I), x | y, z; "
               "q(y|x) q(z|x, y), y summed out where unlabelled (--estimator traceenum); --labels N keeps N labels, "
               "--aux-weight the classification loss")

LIKELIHOODS = Registry("likelihood")
LIKELIHOODS.declare("bernoulli", "pyro_vae.likelihoods:BernoulliLikelihood",
                    "binary pixels, x ~ Bernoulli(logits = decoder output); grey images are binarised")
LIKELIHOODS.declare("continuous-bernoulli", "pyro_vae.likelihoods:ContinuousBernoulliLikelihood",
                    "grey values in [0, 1], the continuous Bernoulli with its normalising constant")
LIKELIHOODS.declare("gaussian", "pyro_vae.likelihoods:GaussianLikelihood",
                    "grey values, x ~ Normal(sigmoid(decoder output), learned scale per pixel)")
LIKELIHOODS.declare("gaussian-shared", "pyro_vae.likelihoods:SharedScaleGaussianLikelihood",
                    "grey values, x ~ Normal(sigmoid(decoder output), one learned scale for all pixels)")
LIKELIHOODS.declare("discretized-logistic", "pyro_vae.likelihoods:DiscretizedLogisticLikelihood",
                    "8-bit grey values, a logistic(decoder output, learned scale per pixel) discretised to 256 bins")
LIKELIHOODS.declare("discretized-logistic-local", "pyro_vae.likelihoods:LocalDiscretizedLogisticLikelihood",
                    "8-bit grey values, a logistic discretised to 256 bins whose location and scale per pixel "
                    "both come from the decoder")
LIKELIHOODS.declare("categorical-256", "pyro_vae.likelihoods:Categorical256Likelihood",
                    "8-bit grey values, a 256-way softmax per pixel from the decoder")

NETWORKS = Registry("network")
NETWORKS.declare("mlp", "pyro_vae.networks:mlp_pair", "fully connected layers of --hidden-dims")
NETWORKS.declare("conv", "pyro_vae.networks:conv_pair",
                 "two stride-2 convolutions (H, W divisible by 4), then the last of --hidden-dims")

ACTIVATIONS = Registry("activation")
ACTIVATIONS.declare("relu", "torch.nn:ReLU", "max(0, h)")
ACTIVATIONS.declare("softplus", "pyro_vae.networks:Softplus", "log(1 + e^h)")
ACTIVATIONS.declare("tanh", "torch.nn:Tanh", "tanh(h) (Burda et al. 2015)")
ACTIVATIONS.declare("elu", "torch.nn:ELU", "exponential linear unit")
ACTIVATIONS.declare("gelu", "torch.nn:GELU", "Gaussian error linear unit")

ESTIMATORS = Registry("estimator")
ESTIMATORS.declare("trace", "pyro_vae.objectives:OnDeviceTrace_ELBO",
                   "Trace_ELBO: Monte Carlo KL at reparameterised samples")
ESTIMATORS.declare("meanfield", "pyro_vae.objectives:OnDeviceTraceMeanField_ELBO",
                   "TraceMeanField_ELBO: the KL in closed form where one exists")
ESTIMATORS.declare("traceenum", "pyro_vae.objectives:OnDeviceTraceEnum_ELBO",
                   "TraceEnum_ELBO: sites marked infer={'enumerate': 'parallel'} summed out exactly (discrete latents)")
ESTIMATORS.declare("tracegraph", "pyro_vae.objectives:OnDeviceTraceGraph_ELBO",
                   "TraceGraph_ELBO: score-function gradients with downstream costs only, for latents drawn "
                   "without reparameterisation")
ESTIMATORS.declare("iwae", "pyro_vae.objectives:ImportanceWeightedELBO",
                   "the importance-weighted bound (Burda et al.): per image, log of the mean of K = "
                   "--num-particles weights p(x, z) / q(z|x)")
ESTIMATORS.declare("iwae-dreg", "pyro_vae.objectives:ImportanceWeightedELBO_DReG",
                   "iwae with the doubly reparameterised gradient for the guide (Tucker et al.)")

OBJECTIVES = Registry("objective")
OBJECTIVES.declare("elbo", "pyro_vae.objectives:elbo_objective",
                   "the ELBO, with the KL term weighted by --beta and the warm-up")
OBJECTIVES.declare("kl-only", "pyro_vae.objectives:kl_only_objective",
                   "the KL term alone: the observed sites hidden (posterior collapse, on purpose)")

ENGINES = Registry("engine")
ENGINES.declare("captured", "pyro_vae.steps:CapturedEngine",
                "module, replaying a recording of the ELBO's forward pass (pyro_vae.capture)")
ENGINES.declare("module", "pyro_vae.steps:ModuleEngine", "the ELBO as a torch module, one fused torch Adam")
ENGINES.declare("svi", "pyro_vae.steps:SVIEngine", "pyro.infer.SVI with pyro.optim.Adam")

DATASETS = Registry("dataset")
DATASETS.declare("mnist", "pyro_vae.data:_load_mnist", "MNIST digits, 60,000 + 10,000 grey 28 x 28 images")
DATASETS.declare("fashion-mnist", "pyro_vae.data:_load_fashion_mnist",
                 "Fashion-MNIST clothes, 60,000 + 10,000 grey 28 x 28 images")
DATASETS.declare("binarized-mnist", "pyro_vae.data:_load_binarized_mnist",
                 "Larochelle & Murray's fixed binarisation of MNIST, 50,000 + 10,000 (+ 10,000 valid)")
DATASETS.declare("frey", "pyro_vae.data:_load_frey",
                 "Frey Face, 1,965 grey 28 x 20 faces, split in time: the first 1,765 frames train, the last 200 test")
DATASETS.declare("frey-shuffled", "pyro_vae.data:_load_frey_shuffled",
                 "Frey Face as FFJORD and the Sylvester-flow papers split it: the 1,965 frames shuffled (seed 0), "
                 "1,565 train, 200 valid, 200 test")

FIGURES = Registry("figure")  # one run each: drawn by pyro_vae.plots.draw_figures
FIGURES.declare("latent", "pyro_vae.plots:_draw_latent",
                "posterior means E_q[z|x] of the test images in 2-D (PCA or t-SNE beyond 2-D), coloured by class when "
                "the data set has labels")
FIGURES.declare("manifold", "pyro_vae.plots:_draw_manifold",
                "decoder means E[x|z] over a 20x20 grid of z at prior quantiles (z_dim = 2 only)")
FIGURES.declare("samples", "pyro_vae.plots:_draw_samples", "decoder means E[x|z] of 64 draws z ~ p(z)")
FIGURES.declare("reconstructions", "pyro_vae.plots:_draw_reconstructions",
                "test images above their reconstructions E[x | z = E_q[z|x]]")
FIGURES.declare("interpolation", "pyro_vae.plots:_draw_interpolation",
                "decoded paths between the posterior means of pairs of test images (and slerp paths with --spherical)")
FIGURES.declare("dims", "pyro_vae.plots:_draw_dims",
                "per latent dimension: q(z_d|x) of a few test images, KL from the prior, activity")
FIGURES.declare("curves", "pyro_vae.plots:_draw_curves",
                "ELBO, expected log-likelihood and KL per epoch, train and test")
FIGURES.declare("analogies", "pyro_vae.figures.kinds:_draw_analogies",
                "models with a class and a style (m2): the style z of 8 test digits held fixed while the class y runs "
                "over every class (Kingma et al. 2014, Figure 1); drawn by 'all' where the model has classes")
FIGURES.declare("posterior", "pyro_vae.plots:_draw_posterior",
                "z_dim = 2: true posterior p(z|x) by NUTS against q(z|x) and the per-image optimum q*(z|x), for 4 "
                "test images (minutes: NUTS; only when asked for)")

FIGURES.declare("completion", "pyro_vae.plots:_draw_completion",
                "quadrant completion (--model cvae, cvae-baseline): test images with the hidden quadrants greyed, "
                "the true images, the baseline's prediction and completions from the CVAE's prior p(z | shown)")

COMPARISONS = Registry("comparison figure")  # several runs in one figure: drawn by pyro_vae.plots.draw_comparison
COMPARISONS.declare("comparison", "pyro_vae.plots:_draw_comparison",
                    "2-D posterior means of the same test images, one panel per run (e.g. autoencoder, KL only, VAE)")
COMPARISONS.declare("kl-profile", "pyro_vae.plots:_draw_kl_profile",
                    "KL and activity per latent dimension of each run, sorted: posterior collapse")
