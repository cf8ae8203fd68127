"""Images and labels, from disk to the tensors a model reads: `datasets` (a data directory as training, validation or
held-out images; the one directory check), `idx` (IDX files), `images` (image files and ImageFolder trees),
`imageset` (images in memory, the one split rule), `preprocessing` (the normalisation, size and augmentation a model
declares), `transforms` (timm's eval transform and the seeded training augmentation), `loading` (the sampler and
DataLoader that feed calibration on one process or many). Nothing here holds more decoded images than asked for:
training streams file by file (IDX files as their raw bytes). May import `errors` only; anything may import it.
"""
