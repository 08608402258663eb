//! Firmware bridge: lets microcontrollers (ESP8266/ESP32, Arduino on a serial
//! port) publish and receive Covey events. Not implemented yet; it has its own
//! issue. This crate exists so the workspace layout is final.
