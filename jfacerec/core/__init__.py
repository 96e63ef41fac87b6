"""The bottom layer, used by every other package: device meshes and shardings (`parallel`), the
workdir's files (`workdir`), checkpoints (`checkpoint`), atomic writes (`atomic`) and the flags and
error handling shared by the commands (`cli`). Nothing here imports the rest of jfacerec."""
