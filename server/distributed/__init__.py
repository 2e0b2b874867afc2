"""Scale-out: moleserve engines behind Ray Serve (ray_serve.py); see docs/scale-out.md."""
