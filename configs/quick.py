"""A few-minute CPU run: the source style on a half-size grid (60x60x32) with a small UNet."""

from flaxdose.configs import source


def get_config():
    c = source.get_config()
    c.model.update(features=(8, 16, 32), convs_per_level=2, groups=4)
    c.data.update(n_train=24, n_test=4, scale=0.5, patch_shape=(32, 32, 16), patch_sigma=(8.0, 8.0, 4.0),
                  val_cases=4, workers=0)
    # Every checkpoint is validated (sliding windows, as evaluation predicts): every 50 steps keeps
    # the run's validation to 6 passes; a kill -9 loses at most 50 steps.
    c.train.update(steps=300, batch_size=4, learning_rate=1e-3, log_every=10, eval_every=50, checkpoint_every=50)
    return c
