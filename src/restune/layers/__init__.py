"""Building blocks shared by tuners and the bypass: the Res-Tuner scale and named activations."""
